"""Every Python code block of the README and of docs/ runs, so examples cannot rot.

Each page runs in its own interpreter (tests/docs_runner.py), its blocks in order in
one namespace, against this session's Redis (``EVENTBUS_REDIS_URL``, a namespace of
the test's own).  Shell blocks are the commands the deployment tests run
(tests/test_deployment.py, tests/test_cli.py).  ``mkdocs build --strict`` runs in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_runner import blocks

pytest_plugins = ["tests.redis_support"]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p.read_text())], ids=lambda p: p.name)
def test_python_blocks_run(page: Path, redis_url: str, namespace: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
    }
    env.pop("EVENTBUS_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs_runner", str(page)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout}\n{done.stderr}"
    assert f"{len(blocks(page.read_text()))} block(s) ran" in done.stdout


def index_from_readme(readme: str) -> str:
    """docs/index.md: the README, its links made relative to docs/."""
    return readme.replace("](docs/", "](")


def test_docs_front_page_is_the_readme() -> None:
    expected = index_from_readme((ROOT / "README.md").read_text())
    assert (ROOT / "docs" / "index.md").read_text() == expected, (
        "docs/index.md drifted from README.md: regenerate it with "
        "python -c 'from tests.test_docs import write_index; write_index()'"
    )


def write_index() -> None:
    """Regenerate docs/index.md from README.md."""
    (ROOT / "docs" / "index.md").write_text(index_from_readme((ROOT / "README.md").read_text()))
