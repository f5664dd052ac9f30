"""Is a DLQ topic configured to keep its dead letters?

Kafka deletes records by itself in two ways, both fatal to a dead-letter store:
compaction keeps only the newest record per key (a claimed or released dead
letter's newest record is its marker), and retention deletes records older than
``retention.ms`` or beyond ``retention.bytes``, replayed or not.
:class:`TopicCheck` reads each DLQ topic's configuration once per process and
logs a WARNING naming the topic and the setting to change.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from eventbus.kafka.config import KafkaConfig

logger = logging.getLogger("eventbus.kafka.dlq")


def topic_problems(configs: dict[str, str]) -> list[str]:
    """What in a DLQ topic's configuration loses dead letters (empty: nothing)."""
    problems = []
    if "compact" in configs.get("cleanup.policy", ""):
        problems.append(
            f"cleanup.policy={configs['cleanup.policy']} keeps only the newest record per "
            "key, so a claimed or released dead letter is deleted (its marker is newer)"
        )
    for name in ("retention.ms", "retention.bytes"):
        value = configs.get(name)
        if value is not None and value.strip() != "-1":
            problems.append(f"{name}={value} deletes dead letters nobody replayed")
    return problems


class TopicCheck:
    """Checks DLQ topics' configuration, each existing topic once per process.

    Safe to use from several threads and event loops (the backend's and the
    dead-letter view's).

    Parameters:
      config: Connection settings.
      timeout: Seconds one check's admin requests may take.
    """

    def __init__(self, config: KafkaConfig, timeout: float) -> None:
        self.config = config
        self.timeout = timeout
        self._checked: set[str] = set()
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def _todo(self, topics: list[str]) -> list[str]:
        with self._lock:
            return [t for t in topics if t not in self._checked]

    def check_soon(self, topics: list[str]) -> None:
        """:meth:`check` ``topics`` in the background, on the running loop."""
        todo = self._todo(topics)
        if todo:
            task = asyncio.get_running_loop().create_task(self.check(todo))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        """Cancel the checks :meth:`check_soon` started."""
        for task in list(self._tasks):
            task.cancel()

    async def check(self, topics: list[str]) -> None:
        """Log a WARNING for each existing topic among ``topics`` whose configuration
        loses dead letters; topics that do not exist yet are checked next time."""
        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        todo = self._todo(topics)
        if not todo:
            return
        admin = self.config.admin(request_timeout_ms=int(self.timeout * 1000))
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            todo = [t for t in todo if t in existing]
            if not todo:
                return
            resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in todo]
            responses = await admin.describe_configs(resources)
        except Exception as exc:  # a check never stops the bus
            logger.info("Could not check the DLQ topics' configuration: %r", exc)
            return
        finally:
            await admin.close()
        for response in responses:
            for resource in response.to_object()["resources"]:
                if resource["error_code"]:
                    continue
                name = str(resource["resource_name"])
                with self._lock:
                    if name in self._checked:
                        continue
                    self._checked.add(name)
                configs = {
                    str(e["config_names"]): str(e["config_value"])
                    for e in resource["config_entries"]
                    if e["config_value"] is not None
                }
                problems = topic_problems(configs)
                if problems:
                    logger.warning(
                        "DLQ topic %s can lose dead letters: %s. Set cleanup.policy=delete, "
                        "retention.ms=-1 and retention.bytes=-1 on it.",
                        name,
                        "; ".join(problems),
                    )
