"""A small FastAPI app for the test-kit tests: POST /users publishes UserCreated,
two handlers react (one idempotent on ``event_id``, one not) and one publishes on.

``make_shop`` builds a fresh one per test, on topics of its own.  Its handlers are
registered on its bus only: ``@on_event`` handlers are process-wide, and every bus
that other tests start later (Kafka, Redis) would subscribe to them.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel

from eventbus import (
    BaseEvent,
    EventBus,
    EventBusSettings,
    RetryPolicy,
    create_lifespan,
    get_event_bus,
)
from eventbus.registry import make_spec

_ids = itertools.count()


@dataclass
class Shop:
    """The app, its bus, its event classes and handlers, and what the handlers did."""

    app: FastAPI
    bus: EventBus
    UserCreated: type[BaseEvent]
    WelcomeSent: type[BaseEvent]
    send_welcome: Any
    count_signup: Any
    note_welcome: Any
    #: Emails sent by send_welcome (idempotent: once per event_id).
    emails: list[str] = field(default_factory=list)
    #: user ids counted by count_signup (not idempotent: once per run).
    signups: list[int] = field(default_factory=list)
    #: user ids whose WelcomeSent reached note_welcome.
    welcomed: list[int] = field(default_factory=list)
    #: user ids for which send_welcome raises ValueError.
    broken: set[int] = field(default_factory=set)


class NewUser(BaseModel):
    user_id: int
    email: str


def make_shop(
    settings: EventBusSettings | None = None, retry_policy: RetryPolicy | None = None
) -> Shop:
    """A fresh shop app on topics of its own (default: a Redis-configured bus whose
    Redis does not exist: only the test kit can run it)."""
    prefix = f"kit.{os.getpid()}.{next(_ids)}"

    class UserCreated(BaseEvent):
        topic: str = f"{prefix}.user.created"
        user_id: int
        email: str

    class WelcomeSent(BaseEvent):
        topic: str = f"{prefix}.welcome.sent"
        user_id: int

    if settings is None:
        settings = EventBusSettings(backend="redis", redis_url="redis://127.0.0.1:1/0")
    bus = EventBus(settings=settings, retry_policy=retry_policy)
    app = FastAPI(lifespan=create_lifespan(bus))
    processed: set[str] = set()

    async def send_welcome(event: UserCreated) -> None:
        if event.user_id in shop.broken:
            raise ValueError(f"no mailbox for user {event.user_id}")
        if event.event_id in processed:
            return
        shop.emails.append(event.email)
        await bus.publish(WelcomeSent(user_id=event.user_id))
        processed.add(event.event_id)

    def count_signup(event: UserCreated) -> None:
        shop.signups.append(event.user_id)

    async def note_welcome(event: WelcomeSent) -> None:
        shop.welcomed.append(event.user_id)

    bus.registry.add(make_spec(UserCreated, send_welcome))
    bus.registry.add(make_spec(UserCreated, count_signup))
    bus.registry.add(make_spec(WelcomeSent, note_welcome))

    @app.post("/users", status_code=201)
    async def create_user(user: NewUser, bus: EventBus = Depends(get_event_bus)) -> dict[str, int]:
        await bus.publish(UserCreated(user_id=user.user_id, email=user.email))
        return {"user_id": user.user_id}

    shop = Shop(app, bus, UserCreated, WelcomeSent, send_welcome, count_signup, note_welcome)
    return shop
