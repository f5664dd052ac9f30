"""Reference consumer for the Kafka benchmark: raw aiokafka, one group member.

Usage: python _kafka_raw_consumer.py BOOTSTRAP TOPIC GROUP N OUT

Reads N records (decoding each JSON value, as any consumer must), commits after
every fetched batch, writes ``time.time()`` to OUT when done.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiokafka import AIOKafkaConsumer


async def main(bootstrap: str, topic: str, group: str, n: int, out: str) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
    )
    await consumer.start()
    print("assigned", flush=True)
    seen = 0
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    json.loads(record.value)
                    seen += 1
            if batch:
                await consumer.commit()
        _write(out, f"{time.time():.6f}")
    finally:
        await consumer.stop()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    b, t, g, n, o = sys.argv[1:6]
    asyncio.run(main(b, t, g, int(n), o))
