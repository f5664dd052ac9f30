"""Run the Python code blocks of one Markdown page, in order, in one namespace.

    python -m tests.docs_runner docs/guide.md

Blocks may ``await`` at top level (they share one event loop).  The page's
buses are stopped at the end.  Used by tests/test_docs.py, one subprocess per
page, so that the event classes and handlers of one page never meet another's.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
import sys
from pathlib import Path
from typing import Any

#: A fenced Python block: ```python ... ```
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of every Python block of a page."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def run(path: Path) -> int:
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    ran = 0
    for line, source in blocks(path.read_text()):
        code = compile(
            "\n" * (line - 1) + source, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        )
        result = eval(code, namespace)  # our own documentation
        if inspect.iscoroutine(result):
            loop.run_until_complete(result)
        ran += 1
    from eventbus import EventBus

    for value in list(namespace.values()):
        if isinstance(value, EventBus) and value.started:
            loop.run_until_complete(value.stop())
    loop.close()
    return ran


if __name__ == "__main__":
    count = run(Path(sys.argv[1]))
    print(f"{count} block(s) ran")
