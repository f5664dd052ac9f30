"""The publisher process of bench/production_bench.py for eventbus and raw dramatiq.

Usage (repo root on ``PYTHONPATH``, ``BENCH_REDIS_URL`` set)::

    _production_publisher.py URL eventbus|dramatiq

Publishes events one by one (``await bus.publish(Prod(...))`` or ``prod.send(i,
sent)``) as told on stdin: see :func:`bench._production_common.serve`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._production_common import serve


async def main(url: str, system: str) -> None:
    if system == "dramatiq":
        from bench._production_actors import prod

        async def send(i: int, sent: float) -> None:
            prod.send(i, sent)

        await serve(send)
        return
    from bench._production_handlers import Prod
    from bench.redis_bench import make_bus

    bus = make_bus(url)
    await bus.start()
    try:

        async def publish(i: int, sent: float) -> None:
            await bus.publish(Prod(i=i, sent=sent))

        await serve(publish)
    finally:
        await bus.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
