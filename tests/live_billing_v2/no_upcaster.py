"""Billing's handler of version 2 deployed without the upcaster from version 1."""

from __future__ import annotations

from eventbus import on_event
from tests.live_billing_v2.events import OrderPlaced


@on_event(OrderPlaced, name="live_billing_v2.bill")
async def bill(event: OrderPlaced) -> None:
    del event
