"""``gc.freeze()`` at worker boot is opt-in (EVENTBUS_WORKER_GC_FREEZE): a library does
not change the interpreter's collector behind the application's back.

The worker boots as ``dramatiq eventbus.actors`` boots it (the module builds the bus
from the environment; the Worker emits ``before_worker_boot``), in a subprocess,
against the real Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.register_assert_rewrite("tests.redis_support")
from tests.redis_support import ROOT  # noqa: E402

pytest_plugins = ["tests.redis_support"]
pytestmark = pytest.mark.timeout(60)

BOOT = """
import gc, os, dramatiq
import eventbus.actors as actors

before = gc.get_freeze_count()
worker = dramatiq.Worker(actors.broker, worker_threads=1)
worker.start()  # emits before_worker_boot: eventbus's DeclareHandlers runs
print(before, gc.get_freeze_count(), flush=True)
os._exit(0)  # the objects frozen or not are all this test wanted
"""


def frozen_after_boot(redis_url: str, namespace: str, **env: str) -> tuple[int, int]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    full_env |= {
        "PYTHONPATH": str(ROOT),
        "EVENTBUS_BACKEND": "redis",
        "EVENTBUS_REDIS_URL": redis_url,
        "EVENTBUS_REDIS_NAMESPACE": namespace,
        "EVENTBUS_HANDLERS": "tests.redis_handlers",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", BOOT],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    return int(before), int(after)


def test_a_worker_leaves_the_garbage_collector_alone_by_default(
    redis_url: str, namespace: str
) -> None:
    assert frozen_after_boot(redis_url, namespace) == (0, 0)


def test_a_worker_freezes_its_boot_objects_when_asked(redis_url: str, namespace: str) -> None:
    before, after = frozen_after_boot(redis_url, namespace, EVENTBUS_WORKER_GC_FREEZE="true")
    assert before == 0
    assert after > 10_000  # every module imported at boot, the handlers' included
