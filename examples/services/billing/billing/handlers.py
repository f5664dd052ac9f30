"""Billing: charges each order.  While the file payments.down exists (or the file
BILLING_OUTAGE_FILE names), the payment provider is "down": charging fails."""

import logging
import os
from pathlib import Path

from billing.events import OrderPlaced
from eventbus import on_event

logger = logging.getLogger(__name__)
OUTAGE = Path(os.environ.get("BILLING_OUTAGE_FILE", "payments.down"))


@on_event(OrderPlaced, name="billing.charge", max_retries=2)
def charge(event: OrderPlaced) -> None:
    if OUTAGE.exists():
        raise ConnectionError(f"payment provider down: order {event.order_id} not charged")
    logger.info("order %s charged %s cents", event.order_id, event.total_cents)
