"""A handler subscribed to a mistyped topic (``deploy.ordres`` for ``deploy.orders``):
what the boot check and ``eventbus subscriptions list`` must point out."""

from __future__ import annotations

from eventbus import BaseEvent, on_event


@on_event("deploy.ordres", name="typo.ordres")
def mistyped(event: BaseEvent) -> None:
    """Never runs: nothing is published to its topic."""
