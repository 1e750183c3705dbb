"""The adapter cache policy: which revisions live in host memory and in device slots.

Bookkeeping only. The policy never touches tensors, files or locks: the mechanism
(:mod:`.manager`) asks it to admit a revision to a tier, and the policy decides what has to go
to make room and tells the mechanism through :class:`TierHooks`. Callers serialise access (the
mechanism holds one lock around every call).

Tiers are inclusive: a revision in a device slot is also in host memory, and leaving host
memory leaves the device too. The host budget therefore counts every in-memory revision,
device-resident ones included.

A revision is *protected* while requests use it (``in_flight > 0``, which also covers a load in
progress) or while it is pinned; a protected revision is never evicted from any tier. When no
unprotected victim can make room, admission fails (``None`` / ``False``) without evicting
anything, and the caller decides whether to wait or refuse.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

from lorafleet.platform.domain.errors import Conflict, InvalidRequest, LorafleetError


class TierHooks(Protocol):
    """What the mechanism does when the policy evicts (it never promotes on its own)."""

    def on_evict_device(self, revision_id: str, slot: int) -> None:
        """The revision left device slot ``slot``; it stays in host memory."""
        ...

    def on_evict_host(self, revision_id: str) -> None:
        """The revision left host memory (its device slot, if any, was evicted just before)."""
        ...


@dataclass
class _Entry:
    nbytes: int
    last_used: int
    slot: int | None = None


@dataclass(frozen=True)
class Residency:
    """One in-memory revision as the policy sees it."""

    revision_id: str
    nbytes: int
    slot: int | None
    """Device slot, or None when only in host memory."""
    pinned: bool
    in_flight: int
    last_used: int
    """Logical time of the last use: larger is more recent."""


class CachePolicy:
    """LRU over two tiers with pins and in-flight protection (see module doc)."""

    def __init__(
        self,
        *,
        max_device_slots: int,
        max_host_bytes: int,
        hooks: TierHooks,
    ) -> None:
        if max_device_slots < 1:
            raise InvalidRequest("max_device_slots must be at least 1", param="max_device_slots")
        if max_host_bytes < 1:
            raise InvalidRequest("max_host_bytes must be positive", param="max_host_bytes")
        self.max_device_slots = max_device_slots
        self.max_host_bytes = max_host_bytes
        self._hooks = hooks
        # A logical clock: LRU needs only the order of uses, and ties never happen.
        self._ticks = itertools.count()
        self._host: dict[str, _Entry] = {}
        self._slots: list[str | None] = [None] * max_device_slots  # slot -> revision
        self._uses: dict[str, int] = {}
        self._pins: set[str] = set()

    # -- protection ---------------------------------------------------------------------------

    def begin_use(self, revision_id: str) -> None:
        """A request (or a load) starts using the revision: it cannot be evicted until :meth:`end_use`."""
        self._uses[revision_id] = self._uses.get(revision_id, 0) + 1
        self._touch(revision_id)

    def end_use(self, revision_id: str) -> None:
        count = self._uses.get(revision_id, 0)
        if count <= 0:
            raise InvalidRequest(f"revision {revision_id} has no use to end", code="adapter_not_in_use")
        if count == 1:
            del self._uses[revision_id]
        else:
            self._uses[revision_id] = count - 1
        self._touch(revision_id)

    def pin(self, revision_id: str) -> None:
        self._pins.add(revision_id)

    def unpin(self, revision_id: str) -> None:
        self._pins.discard(revision_id)

    def in_flight(self, revision_id: str) -> int:
        return self._uses.get(revision_id, 0)

    def protected(self, revision_id: str) -> bool:
        return revision_id in self._pins or self._uses.get(revision_id, 0) > 0

    # -- host tier ----------------------------------------------------------------------------

    def admit_host(self, revision_id: str, nbytes: int) -> bool:
        """Reserve ``nbytes`` of host memory for the revision, evicting least recently used
        unprotected revisions as needed. False (and nothing evicted) when they cannot make room."""
        if nbytes < 0:
            raise InvalidRequest("nbytes must be >= 0", param="nbytes")
        entry = self._host.get(revision_id)
        if entry is not None:
            self._touch(revision_id)
            return True
        if nbytes > self.max_host_bytes:
            raise LorafleetError(
                f"an adapter of {nbytes} bytes can never fit host memory of {self.max_host_bytes} bytes",
                code="adapter_exceeds_host_tier",
            )
        victims = self._host_victims(self.host_bytes + nbytes - self.max_host_bytes)
        if victims is None:
            return False
        for victim in victims:
            self._drop_host(victim)
        self._host[revision_id] = _Entry(nbytes=nbytes, last_used=next(self._ticks))
        return True

    def in_host(self, revision_id: str) -> bool:
        return revision_id in self._host

    @property
    def host_bytes(self) -> int:
        return sum(e.nbytes for e in self._host.values())

    # -- device tier --------------------------------------------------------------------------

    def assign_device(self, revision_id: str) -> int | None:
        """The device slot of the revision (already in host memory), claiming one if needed: a
        free slot first, else the least recently used unprotected revision's. None when every
        slot holds a protected revision (nothing is evicted then)."""
        entry = self._host.get(revision_id)
        if entry is None:
            raise InvalidRequest(
                f"revision {revision_id} must be in host memory before it gets a device slot",
                code="adapter_not_in_host",
            )
        self._touch(revision_id)
        if entry.slot is not None:
            return entry.slot
        slot = next((i for i, rid in enumerate(self._slots) if rid is None), None)
        if slot is None:
            candidates = [
                (self._host[rid].last_used, i, rid)
                for i, rid in enumerate(self._slots)
                if rid is not None and not self.protected(rid)
            ]
            if not candidates:
                return None
            _, slot, victim = min(candidates)
            self._drop_device(victim)
        self._slots[slot] = revision_id
        entry.slot = slot
        return slot

    def slot_of(self, revision_id: str) -> int | None:
        entry = self._host.get(revision_id)
        return None if entry is None else entry.slot

    @property
    def device_used(self) -> int:
        return sum(rid is not None for rid in self._slots)

    # -- explicit removal ---------------------------------------------------------------------

    def evict(self, revision_id: str) -> None:
        """Drop the revision from both tiers (and its pin). Refused while requests use it."""
        if self._uses.get(revision_id, 0) > 0:
            raise Conflict(
                f"revision {revision_id} has {self._uses[revision_id]} requests in flight",
                code="adapter_in_use",
            )
        self._pins.discard(revision_id)
        if revision_id in self._host:
            self._drop_host(revision_id)

    def forget(self, revision_id: str) -> None:
        """Drop a reservation whose load failed (no hooks: nothing was installed)."""
        entry = self._host.pop(revision_id, None)
        if entry is not None and entry.slot is not None:
            self._slots[entry.slot] = None

    def entries(self) -> list[Residency]:
        return [
            Residency(
                revision_id=rid,
                nbytes=e.nbytes,
                slot=e.slot,
                pinned=rid in self._pins,
                in_flight=self._uses.get(rid, 0),
                last_used=e.last_used,
            )
            for rid, e in self._host.items()
        ]

    # -- internals ----------------------------------------------------------------------------

    def _touch(self, revision_id: str) -> None:
        entry = self._host.get(revision_id)
        if entry is not None:
            entry.last_used = next(self._ticks)

    def _host_victims(self, excess: int) -> list[str] | None:
        if excess <= 0:
            return []
        victims: list[str] = []
        for rid, entry in sorted(self._host.items(), key=lambda item: item[1].last_used):
            if self.protected(rid):
                continue
            victims.append(rid)
            excess -= entry.nbytes
            if excess <= 0:
                return victims
        return None

    def _drop_device(self, revision_id: str) -> None:
        entry = self._host[revision_id]
        if entry.slot is None:
            return
        slot, entry.slot = entry.slot, None
        self._slots[slot] = None
        self._hooks.on_evict_device(revision_id, slot)

    def _drop_host(self, revision_id: str) -> None:
        self._drop_device(revision_id)
        del self._host[revision_id]
        self._hooks.on_evict_host(revision_id)
