"""The JobQueue seam: at-least-once delivery with leases.

A handler must be idempotent: a message whose lease expires before ``ack`` is delivered
again (to this or another worker). ``claim`` never hands one message to two workers at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    id: str
    """Stable across redeliveries."""
    queue: str
    payload: dict[str, Any]
    attempts: int
    """How many times this message has been claimed, this claim included."""
    receipt: str = field(default="", compare=False)
    """Backend handle proving this claim; ack / extend / release need it."""


@runtime_checkable
class JobQueue(Protocol):
    def enqueue(self, queue: str, payload: dict[str, Any], *, dedupe_key: str | None = None,
                delay_seconds: float = 0.0) -> str:
        """Add a message; with ``dedupe_key``, a second enqueue of the same key returns the first id."""
        ...

    def claim(self, queue: str, *, worker: str, lease_seconds: float) -> Message | None:
        """Take the oldest available message under a lease, or None."""
        ...

    def extend(self, message: Message, *, lease_seconds: float) -> bool:
        """Heartbeat: push the lease out. False when the lease was lost (another worker may hold it)."""
        ...

    def ack(self, message: Message) -> None:
        """Done: the message is removed and never redelivered."""
        ...

    def release(self, message: Message, *, delay_seconds: float = 0.0) -> None:
        """Explicit retry: give the message back, available again after ``delay_seconds``."""
        ...

    def depth(self, queue: str) -> int:
        """Messages not yet acknowledged (waiting or leased)."""
        ...
