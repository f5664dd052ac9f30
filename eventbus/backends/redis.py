"""Moved to :mod:`eventbus.redis`; this path keeps working with a DeprecationWarning."""

from __future__ import annotations

import warnings

from eventbus.redis import *  # noqa: F403
from eventbus.redis import __all__ as __all__

warnings.warn(
    "eventbus.backends.redis moved: import from eventbus.redis",
    DeprecationWarning,
    stacklevel=2,
)
