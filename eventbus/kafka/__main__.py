"""``python -m eventbus.kafka MODULE...``: a Kafka worker process."""

from __future__ import annotations

from eventbus.kafka.worker import main

raise SystemExit(main())
