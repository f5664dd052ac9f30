"""The Kafka backend (``pip install "fastapi-eventbus[kafka]"``): one record per event,
a consumer group per service, a bridge feeding in-process handlers, offsets
committed once every handler of a record finished, dead letters in a topic.

    from eventbus.kafka import KafkaBackend

Worker processes: ``dramatiq eventbus.actors`` or ``python -m eventbus.kafka MODULE...``.
"""

from __future__ import annotations

from eventbus.kafka.backend import KafkaBackend
from eventbus.kafka.worker import main, run_worker, start_worker_thread

__all__ = ["KafkaBackend", "main", "run_worker", "start_worker_thread"]
