"""The shop: a web app that publishes OrderPlaced. It has no handlers."""

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from eventbus import EventBus, EventBusMiddleware, create_lifespan, get_event_bus
from shop.events import OrderPlaced

bus = EventBus()  # EVENTBUS_BACKEND, EVENTBUS_REDIS_URL / EVENTBUS_KAFKA_*: the environment
app = FastAPI(lifespan=create_lifespan(bus))
app.add_middleware(EventBusMiddleware)


class Order(BaseModel):
    order_id: int
    email: str
    total_cents: int


@app.post("/orders")
async def place_order(order: Order, bus: EventBus = Depends(get_event_bus)) -> dict[str, str]:
    event = OrderPlaced(**order.model_dump())
    await bus.publish(event)
    return {"event_id": event.event_id}
