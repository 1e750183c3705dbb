"""The EventBus seam: fire-and-forget notifications between lorafleet processes.

Delivery is *at most once* and only to subscribers connected when the event is published, in
both implementations (in-process queues, Redis pub/sub). Nothing may depend on an event for
correctness: every subscriber also reconciles from the database periodically, and an event only
makes that repair happen sooner (a pointer flip seen in milliseconds instead of a TTL later).

Each subscription delivers on its own thread, in publish order, so a slow subscriber delays
only itself and never the publisher. A callback that raises ends its own subscription (the
error is kept on :attr:`Subscription.error` and logged); other subscriptions go on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.domain.ids import new_ulid

_TOPIC = re.compile(r"[A-Za-z0-9_.-]{1,60}")


def validate_topic(topic: str) -> str:
    """Topics are short identifiers: they become channel names and metric labels."""
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
        raise InvalidRequest(
            f"invalid event topic {topic!r}: 1-60 of letters, digits, _ . -",
            code="invalid_event_topic",
            param="topic",
        )
    return topic


class Event(BaseModel):
    """One notification as a subscriber receives it."""

    # Observed, possibly from a newer publisher: unknown fields are ignored, not refused.
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(default_factory=new_ulid)
    """Unique per publish; lets a subscriber drop a duplicate it may see after a reconnect."""
    topic: str
    payload: dict[str, Any]
    """JSON object; subscribers get their own copy."""
    published_at: float = Field(default_factory=time.time)
    """Unix seconds on the publisher's clock."""


Callback = Callable[[Event], None]


def encode_event(topic: str, payload: dict[str, Any]) -> str:
    """The wire form of a new event; refuses a payload that is not a JSON object."""
    validate_topic(topic)
    if not isinstance(payload, dict):
        raise InvalidRequest(
            "an event payload is a JSON object", code="invalid_event_payload", param="payload"
        )
    try:
        return Event(topic=topic, payload=payload).model_dump_json()
    except PydanticSerializationError as exc:
        raise InvalidRequest(
            f"event payload is not JSON-serialisable: {exc}", code="invalid_event_payload", param="payload"
        ) from exc


@runtime_checkable
class Subscription(Protocol):
    topic: str

    @property
    def alive(self) -> bool:
        """False once closed, or once its callback raised."""
        ...

    @property
    def error(self) -> BaseException | None:
        """What the callback raised, if it did (the subscription ended then)."""
        ...

    def close(self) -> None:
        """Stop delivering; waits for a callback in progress to return. Idempotent."""
        ...


@runtime_checkable
class EventBus(Protocol):
    def publish(self, topic: str, payload: dict[str, Any]) -> Event:
        """Send ``payload`` (a JSON object) to every current subscriber of ``topic``; never blocks on
        subscribers. Raises ``Unavailable`` when the transport is down (the caller decides whether
        that matters: after a committed pointer flip it does not, reconciliation covers it)."""
        ...

    def subscribe(self, topic: str, callback: Callback) -> Subscription:
        """Call ``callback`` on a delivery thread for each event published on ``topic`` from now on.
        Returns once the subscription is active: an event published after it returns is delivered."""
        ...

    def close(self) -> None:
        """Close every subscription this bus made. Idempotent."""
        ...
