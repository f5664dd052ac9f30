"""The seed README's quick start, on the embedded backend.

Run it:   python examples/app.py            (or: uvicorn examples.app:app)
Try it:   curl -X POST localhost:8000/users -H 'X-Correlation-ID: demo-1'
"""

import logging

from fastapi import Depends, FastAPI

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusMiddleware,
    create_lifespan,
    get_correlation_id,
    get_event_bus,
    on_event,
)
from eventbus.fastapi import health_router


# 1. 定义事件
class UserCreated(BaseEvent):
    topic: str = "user.created"
    user_id: int
    username: str


# 2. 注册处理器 (typed: the topic comes from the class, the payload is validated into it)
@on_event(UserCreated)
async def handle_user_created(event: UserCreated) -> None:
    print(f"新用户: {event}  (correlation id {get_correlation_id()})", flush=True)


# 3. 创建应用
bus = EventBus()
app = FastAPI(lifespan=create_lifespan(bus))
app.add_middleware(EventBusMiddleware)


# 4. 发布事件
@app.post("/users")
async def create_user(bus: EventBus = Depends(get_event_bus)):  # type: ignore[no-untyped-def]
    event = UserCreated(user_id=1, username="alice")
    await bus.publish(event)
    return {"status": "ok"}


# 5. Health probes: GET /health (= /health/ready, 503 when unhealthy) and /health/live
app.include_router(health_router())


if __name__ == "__main__":
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    uvicorn.run(app, host="127.0.0.1", port=8000)
