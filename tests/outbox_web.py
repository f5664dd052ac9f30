"""A web process that commits events to the outbox, then dies by SIGKILL.

``python tests/outbox_web.py COUNT``: writes COUNT events (keys ``k0``..``k4``) in
one transaction, prints ``committed``, and kills itself before anything is sent
(its outbox does not relay: a relay elsewhere must deliver them).  Configured by
the environment of :mod:`tests.outbox_support`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from eventbus import EventBus
from eventbus.outbox.outbox import Outbox
from tests.outbox_events import Placed


async def main(count: int) -> None:
    bus = EventBus()
    engine = create_async_engine(os.environ["EVENTBUS_OUTBOX_DATABASE_URL"])
    Outbox(bus, engine, relay=False)
    await bus.start()
    session_maker = async_sessionmaker(engine)
    async with session_maker() as session, session.begin():
        events = [Placed(key=f"k{i % 5}", seq=i) for i in range(count)]
        await bus.publish_many(events, session=session)
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
