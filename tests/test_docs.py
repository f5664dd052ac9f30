"""Every Python code block of the README and of docs/ runs, so examples cannot rot.

Each page runs in its own interpreter (tests/docs_runner.py), its blocks in order in
one namespace, against this session's Redis (``EVENTBUS_REDIS_URL``, a namespace of
the test's own).  ``console`` blocks run too, with the files of the page's
``py title="..."`` blocks (docs/contracts.md's two-services walkthrough), their
output compared line by line.  ``bash`` blocks are the commands the deployment tests
run (tests/test_deployment.py, tests/test_cli.py).  ``mkdocs build --strict`` runs
in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_runner import runnable

pytest_plugins = ["tests.redis_support"]

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


RUNNABLE = [p for p in PAGES if runnable(p.read_text())]


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.name)
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
        timeout=240,  # docs/contracts.md starts worker processes three times
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout}\n{done.stderr}"
    assert f"{runnable(page.read_text())} block(s) ran" in done.stdout


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


def test_a_block_runs_under_its_own_future_imports(tmp_path: Path) -> None:
    """A doc block does not inherit the runner's ``from __future__ import annotations``:
    a model nested in a function resolves the names of the function around it, as it
    does when a reader pastes the block into a module of their own."""
    page = tmp_path / "nested.md"
    page.write_text(
        "```python\n"
        "from pydantic import BaseModel\n\n"
        "from eventbus import BaseEvent\n\n\n"
        "def order_class() -> type[BaseEvent]:\n"
        "    class Line(BaseModel):\n"
        "        sku: str\n\n"
        "    def build() -> type[BaseEvent]:\n"
        "        class Order(BaseEvent):\n"
        "            topic: str = 'docs.nested'\n"
        "            lines: list[Line]\n\n"
        "        return Order\n\n"
        "    return build()\n\n\n"
        "order = order_class()(lines=[{'sku': 'a-1'}])\n"
        "assert order.lines[0].sku == 'a-1'\n"
        "```\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs_runner", str(page)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "1 block(s) ran" in done.stdout


def test_a_console_block_is_run_and_its_output_compared(tmp_path: Path) -> None:
    """The runner runs a page's ``console`` blocks in the directory of its ``py
    title`` files: a command whose output differs from the page fails the page."""
    files = '```py title="shop/shop/hello.py"\nprint("hello from", __name__)\n```\n\n'
    page = tmp_path / "session.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(console: str) -> subprocess.CompletedProcess[str]:
        page.write_text(files + "```console\n" + console + "```\n")
        return subprocess.run(
            [sys.executable, "-m", "tests.docs_runner", str(page)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run("$ cd shop\n$ python -m shop.hello\nhello from ...\n$ false  # exits 1\n")
    assert done.returncode == 0, done.stderr
    assert "2 block(s) ran" in done.stdout
    done = run("$ cd shop\n$ python -m shop.hello\nhello from elsewhere\n")
    assert done.returncode == 1
    assert "$ python -m shop.hello" in done.stderr and "hello from __main__" in done.stderr
