"""Run the code blocks of one Markdown page, in order.

    python -m tests.docs_runner docs/guide.md

* ```` ```python ```` blocks run in one namespace.  They may ``await`` at top
  level (they share one event loop); the page's buses are stopped at the end.
* ```` ```py title="shop/shop/events.py" ```` blocks are files of a codebase (the
  convention of docs/services.md): each is written, when the runner reaches it,
  under a directory of the page's own (with an empty ``__init__.py`` next to it);
  a later block with the same title replaces the file, as a change to it does.
* ```` ```console ```` blocks are shell sessions run in that directory, with the
  venv's ``bin`` first on ``PATH`` and the ``EVENTBUS_*`` environment of the
  runner.  ``$ cd DIR`` and ``$ export NAME=VALUE`` change the session;
  ``$ COMMAND &`` starts a process in the background (stopped at the end of the
  page, or by ``$ kill %N``, N counting them from 1 as a shell does); any other
  ``$ COMMAND`` runs in ``bash`` and must exit 0, or the status its ``# exits N``
  comment says.  The lines after a command are its output (stdout and stderr),
  line by line; ``...`` stands for any text within a line, and a line that is only
  ``...`` for any number of lines.  While a background process runs, a command
  whose output does not match yet is run again for up to :data:`SETTLE` seconds
  (a worker takes a moment to start, or to handle an event): make a page wait on
  a command that only reads (``eventbus subscriptions list``, ``cat``), never on
  one that publishes.

Used by tests/test_docs.py, one subprocess per page, so that the event classes
and handlers of one page never meet another's.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: A fenced block the runner runs: ```python, ```py title="FILE" or ```console.
BLOCK = re.compile(
    r'^```(python|py title="([^"]+)"|console)[^\n]*\n(.*?)^```', re.MULTILINE | re.DOTALL
)
#: Seconds a command's output may take to match while background processes run.
SETTLE = 60.0
#: ``# exits N`` at the end of a console command: the exit status it must have.
EXITS = re.compile(r"\s+#\s*exits (\d+)$")


def blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of every Python block of a page (``python``, not files)."""
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(3))
        for m in BLOCK.finditer(text)
        if m.group(1) == "python"
    ]


def runnable(text: str) -> int:
    """How many blocks of a page the runner runs (Python, files and console)."""
    return len(BLOCK.findall(text))


def matches(expected: list[str], got: list[str]) -> bool:
    """Whether output lines ``got`` fit ``expected``: ``...`` as described above,
    and a run of spaces stands for any (a table's columns widen with their values)."""

    def line_pattern(line: str) -> str:
        if line.strip() == "...":
            return "(?:.*\n)*"
        parts = [r" +".join(map(re.escape, part.split(" "))) for part in line.split("...")]
        return re.sub(r"( \+)+", " +", ".*".join(parts)) + "\n"

    pattern = "".join(line_pattern(line.rstrip()) for line in expected)
    return re.fullmatch(pattern, "".join(f"{line.rstrip()}\n" for line in got)) is not None


class Session:
    """The files and shell of a page: its directory, environment and background jobs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="eventbus-docs-"))
        self.cwd = self.root
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        self.env.pop("PYTHONPATH", None)  # each codebase runs from its own directory only
        self.jobs: list[subprocess.Popen[bytes]] = []

    def write(self, name: str, source: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(source)

    def console(self, where: str, source: str) -> None:
        steps: list[tuple[str, list[str]]] = []
        for line in source.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
        for command, expected in steps:
            self.step(where, command, expected)

    def step(self, where: str, command: str, expected: list[str]) -> None:
        words = shlex.split(command, comments=True)
        if words[0] == "cd":
            self.cwd = (self.cwd / words[1]).resolve()
        elif words[0] == "export":
            name, _, value = words[1].partition("=")
            self.env[name] = value
        elif words[0] == "kill":
            self.stop(self.jobs[int(words[1].lstrip("%")) - 1])
        elif command.endswith("&"):
            with (self.root / f"job{len(self.jobs) + 1}.log").open("wb") as log:
                self.jobs.append(
                    subprocess.Popen(
                        ["bash", "-c", command[:-1]],
                        cwd=self.cwd,
                        env=self.env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        else:
            self.run(where, command, expected)

    def run(self, where: str, command: str, expected: list[str]) -> None:
        exits = EXITS.search(command)
        status = int(exits.group(1)) if exits else 0
        deadline = time.monotonic() + (SETTLE if any(j.poll() is None for j in self.jobs) else 0)
        while True:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            got = (done.stdout + done.stderr).splitlines()
            if done.returncode == status and matches(expected, got):
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{where}: $ {command}\nexit status {done.returncode} (expected "
                    f"{status}); output:\n"
                    + "\n".join(got)
                    + "\nexpected:\n"
                    + "\n".join(expected)
                    + self.logs()
                )
            time.sleep(0.5)

    def logs(self) -> str:
        """The output of the background processes, for a failure's message."""
        return "".join(
            f"\n--- background process %{n}:\n" + log.read_text(errors="replace")[-3000:]
            for n, log in enumerate(sorted(self.root.glob("job*.log")), 1)
        )

    @staticmethod
    def stop(job: subprocess.Popen[bytes]) -> None:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGTERM)
            try:
                job.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()

    def close(self) -> None:
        for job in self.jobs:
            self.stop(job)
        shutil.rmtree(self.root, ignore_errors=True)


def run(path: Path) -> int:
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    session = Session()
    ran = 0
    text = path.read_text()
    try:
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 2
            kind, title, source = m.groups()
            if title is not None:
                session.write(title, source)
            elif kind == "console":
                session.console(f"{path}:{line}", source)
            else:
                # dont_inherit: a block runs under its own __future__ imports, not
                # this module's (postponed annotations would leave a model nested in
                # a function unable to resolve the names of the function around it).
                code = compile(
                    "\n" * (line - 1) + source,
                    str(path),
                    "exec",
                    flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                    dont_inherit=True,
                )
                result = eval(code, namespace)  # our own documentation
                if inspect.iscoroutine(result):
                    loop.run_until_complete(result)
            ran += 1
    finally:
        session.close()
    from eventbus import EventBus

    for value in list(namespace.values()):
        if isinstance(value, EventBus) and value.started:
            loop.run_until_complete(value.stop())
    loop.close()
    return ran


if __name__ == "__main__":
    count = run(Path(sys.argv[1]))
    print(f"{count} block(s) ran")
