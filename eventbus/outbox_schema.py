"""Moved to :mod:`eventbus.outbox.schema`; this path keeps working with a DeprecationWarning."""

from __future__ import annotations

import warnings

from eventbus.outbox.schema import *  # noqa: F403
from eventbus.outbox.schema import __all__ as __all__

warnings.warn(
    "eventbus.outbox_schema moved: import from eventbus.outbox.schema",
    DeprecationWarning,
    stacklevel=2,
)
