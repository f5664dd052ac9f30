"""Mailer: confirms each order by email."""

from eventbus import on_event
from mailer.events import OrderPlaced


@on_event(OrderPlaced, name="mailer.confirm")
def confirm(event: OrderPlaced) -> None:
    print(f"mailer: confirmation of order {event.order_id} sent to {event.email}", flush=True)
