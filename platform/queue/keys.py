"""Every Redis key lorafleet writes is built here, under the deployment's ``redis_prefix``.

One module, so a reader can see the whole key space at once and two features cannot
collide. Keys of one queue share a hash tag (``{queue:<name>}``), so they live in one
Redis Cluster slot and a Lua script may touch them together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorafleet.platform.domain.errors import InvalidRequest

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,60}")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def validate_queue_name(queue: str) -> str:
    """Queue names are short identifiers: they appear in keys, rows and metrics labels."""
    if not isinstance(queue, str) or not _NAME.fullmatch(queue):
        raise InvalidRequest(f"invalid queue name {queue!r}: 1-60 of letters, digits, _ . -",
                             code="invalid_queue_name", param="queue")
    return queue


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise InvalidRequest(f"invalid Redis key prefix {self.prefix!r}", code="invalid_settings",
                                 param="redis_prefix")

    # -- job queues (platform/queue/redis_queue.py) --------------------------------------

    def _queue(self, queue: str) -> str:
        return f"{self.prefix}:{{queue:{validate_queue_name(queue)}}}"

    def queue_stream(self, queue: str) -> str:
        """Stream of messages ready or leased; an entry is deleted when acknowledged."""
        return f"{self._queue(queue)}:stream"

    def queue_delayed(self, queue: str) -> str:
        """Sorted set of messages not yet due, scored by due time (ms)."""
        return f"{self._queue(queue)}:delayed"

    def queue_leases(self, queue: str) -> str:
        """Sorted set of leased stream entry ids, scored by lease expiry (ms)."""
        return f"{self._queue(queue)}:leases"

    def queue_dedupe(self, queue: str, dedupe_key: str) -> str:
        """String: dedupe key -> the id of the message first enqueued with it."""
        return f"{self._queue(queue)}:dedupe:{dedupe_key}"

    @property
    def queue_group(self) -> str:
        """Consumer group name (not a key): every worker of every queue is in this group."""
        return f"{self.prefix}:workers"

    # -- notification bus (platform/events/redis_bus.py) ---------------------------------
    # Pub/sub channels share Redis's key namespace in name only (they hold no data), but they
    # carry the deployment's prefix so two deployments on one Redis never hear each other.

    def events_channel(self, topic: str) -> str:
        """Pub/sub channel of one event topic (fire-and-forget: a subscriber that is away misses it)."""
        return f"{self.prefix}:events:{validate_queue_name(topic)}"
