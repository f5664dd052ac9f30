"""Moved to :mod:`eventbus.kafka`; this path keeps working with a DeprecationWarning."""

from __future__ import annotations

import warnings

from eventbus.kafka import *  # noqa: F403
from eventbus.kafka import __all__ as __all__

warnings.warn(
    "eventbus.backends.kafka moved: import from eventbus.kafka",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":  # python -m eventbus.backends.kafka MODULE... (old command)
    from eventbus.kafka.worker import main

    raise SystemExit(main())
