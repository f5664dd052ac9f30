"""``eventbus outbox relay`` whose backend pauses after each publish, before the
batch's transaction commits: a window in which a SIGKILL lands mid-batch.

Prints ``sent N`` once each batch is in the backend; ``OUTBOX_TEST_PAUSE`` is the
pause in seconds (default 1).  Configured by the environment of
:mod:`tests.outbox_support`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from eventbus import EventBus
from eventbus.backends.base import OutgoingEvent
from eventbus.outbox.process import run_relay


def main() -> int:
    bus = EventBus()
    publish = bus.backend.publish
    pause = float(os.environ.get("OUTBOX_TEST_PAUSE", "1"))

    async def publish_then_pause(events: list[OutgoingEvent], *, strict: bool = False) -> set[str]:
        unrouted = await publish(events, strict=strict)
        print(f"sent {len(events)}", flush=True)
        await asyncio.sleep(pause)
        return unrouted

    bus.backend.publish = publish_then_pause  # type: ignore[method-assign]
    return run_relay(bus, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
