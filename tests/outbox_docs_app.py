"""Run docs/outbox.md's code as an application against a real PostgreSQL.

``DATABASE_URL=postgresql+asyncpg://... python -m tests.outbox_docs_app`` runs the
page's Python blocks (as the docs test does), creates the tables, starts the app
with its relay, POSTs a user, and waits for the idempotent handler's row; then
delivers the same event again and checks that it applied once.  Prints
``docs app ok``.
"""

from __future__ import annotations

import ast
import asyncio
import os
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from eventbus.outbox.schema import metadata as eventbus_metadata
from tests.docs_runner import blocks

PAGE = Path(__file__).resolve().parent.parent / "docs" / "outbox.md"


async def setup(namespace: dict[str, Any]) -> None:
    engine = create_async_engine(os.environ["DATABASE_URL"])
    async with engine.begin() as conn:
        for metadata in (namespace["Base"].metadata, eventbus_metadata):
            await conn.run_sync(metadata.drop_all)
            await conn.run_sync(metadata.create_all)
    await engine.dispose()


async def rows(sql: str) -> list[Any]:
    engine = create_async_engine(os.environ["DATABASE_URL"])
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(text(sql))).all())
    finally:
        await engine.dispose()


def main() -> None:
    namespace: dict[str, Any] = {"__name__": "docs_outbox"}
    for line, source in blocks(PAGE.read_text()):
        code = compile(
            "\n" * (line - 1) + source, str(PAGE), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
        )
        exec(code, namespace)  # our own documentation
    asyncio.run(setup(namespace))
    with TestClient(namespace["app"]) as client:
        assert client.post("/users", json={"name": "ada"}).json() == {"created": "ada"}
        deadline = time.monotonic() + 10
        while not asyncio.run(rows("SELECT username FROM payments")):
            assert time.monotonic() < deadline, "the handler never ran"
            time.sleep(0.05)
        # The same event again, as a redelivery would bring it: applied once.
        event = namespace["UserCreated"](username="ada")
        client.portal.call(namespace["open_account"], event)
        client.portal.call(namespace["open_account"], event)
    payments = asyncio.run(rows("SELECT username FROM payments ORDER BY id"))
    assert [row[0] for row in payments] == ["ada", "ada"], payments
    assert asyncio.run(rows("SELECT name FROM users"))[0][0] == "ada"
    assert asyncio.run(rows("SELECT count(*) FROM eventbus_outbox"))[0][0] == 0
    print("docs app ok")


if __name__ == "__main__":
    main()
