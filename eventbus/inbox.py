"""Moved to :mod:`eventbus.outbox.inbox`; this path keeps working with a DeprecationWarning."""

from __future__ import annotations

import warnings

from eventbus.outbox.inbox import *  # noqa: F403
from eventbus.outbox.inbox import __all__ as __all__

warnings.warn(
    "eventbus.inbox moved: import from eventbus.outbox.inbox",
    DeprecationWarning,
    stacklevel=2,
)
