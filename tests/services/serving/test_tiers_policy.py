"""The adapter cache policy, table-driven: eviction order, pins, in-flight protection, byte and slot
budgets, promotion. Each case is a script of operations with the expected answer of each, then
the expected residency and the exact hook calls (in order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from lorafleet.platform.domain.errors import Conflict, InvalidRequest, LorafleetError
from lorafleet.services.serving.tiers import CachePolicy


class RecordingHooks:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_evict_device(self, revision_id: str, slot: int) -> None:
        self.calls.append(("device", revision_id, slot))

    def on_evict_host(self, revision_id: str) -> None:
        self.calls.append(("host", revision_id))


@dataclass
class Case:
    name: str
    script: list[tuple[Any, ...]]
    """(op, revision[, arg], expected): admit(rid, nbytes) -> bool; device(rid) -> slot | None;
    use / end / pin / unpin (rid) -> None; evict(rid) -> None or the error code."""
    host: set[str]
    device: dict[str, int]
    hooks: list[tuple[Any, ...]] = field(default_factory=list)
    slots: int = 2
    host_bytes: int = 300


CASES = [
    Case(
        "host LRU evicts the least recently used first",
        [("admit", "a", 100, True), ("admit", "b", 100, True), ("admit", "c", 100, True),
         ("admit", "a", 100, True),  # a hit: a becomes the most recent
         ("admit", "d", 100, True)],
        host={"a", "c", "d"}, device={}, hooks=[("host", "b")],
    ),
    Case(
        "a large admission evicts as many as it needs, oldest first",
        [("admit", "a", 100, True), ("admit", "b", 100, True), ("admit", "c", 50, True),
         ("admit", "big", 250, True)],
        host={"c", "big"}, device={}, hooks=[("host", "a"), ("host", "b")],
    ),
    Case(
        "in-flight revisions are never host victims; a later one goes instead",
        [("admit", "a", 100, True), ("use", "a", None), ("admit", "b", 100, True), ("admit", "c", 100, True),
         ("admit", "d", 100, True)],
        host={"a", "c", "d"}, device={}, hooks=[("host", "b")],
    ),
    Case(
        "when only protected revisions could make room, nothing is evicted and admission fails",
        [("admit", "a", 150, True), ("pin", "a", None), ("admit", "b", 150, True), ("use", "b", None),
         ("admit", "c", 100, False)],
        host={"a", "b"}, device={}, hooks=[],
    ),
    Case(
        "a partial victim set is never evicted when the rest is protected",
        [("admit", "a", 100, True), ("admit", "b", 150, True), ("use", "b", None), ("admit", "c", 200, False)],
        host={"a", "b"}, device={}, hooks=[],
    ),
    Case(
        "ending the last use makes a revision evictable again",
        [("admit", "a", 200, True), ("use", "a", None), ("use", "a", None), ("admit", "b", 200, False),
         ("end", "a", None), ("admit", "b", 200, False), ("end", "a", None), ("admit", "b", 200, True)],
        host={"b"}, device={}, hooks=[("host", "a")],
    ),
    Case(
        "unpinning makes a revision evictable again",
        [("admit", "a", 200, True), ("pin", "a", None), ("admit", "b", 200, False), ("unpin", "a", None),
         ("admit", "b", 200, True)],
        host={"b"}, device={}, hooks=[("host", "a")],
    ),
    Case(
        "promotion to the device takes free slots in order, then the LRU idle one",
        [("admit", "a", 10, True), ("admit", "b", 10, True), ("admit", "c", 10, True),
         ("device", "a", 0), ("device", "b", 1), ("device", "a", 0),  # a hit refreshes a
         ("device", "c", 1)],
        host={"a", "b", "c"}, device={"a": 0, "c": 1}, hooks=[("device", "b", 1)],
    ),
    Case(
        "a device full of in-use revisions refuses a new one without evicting",
        [("admit", "a", 10, True), ("admit", "b", 10, True), ("admit", "c", 10, True),
         ("use", "a", None), ("device", "a", 0), ("use", "b", None), ("device", "b", 1),
         ("device", "c", None), ("end", "b", None), ("device", "c", 1)],
        host={"a", "b", "c"}, device={"a": 0, "c": 1}, hooks=[("device", "b", 1)],
    ),
    Case(
        "pinned device revisions keep their slots",
        [("admit", "a", 10, True), ("admit", "b", 10, True), ("admit", "c", 10, True),
         ("device", "a", 0), ("pin", "a", None), ("device", "b", 1), ("device", "c", 1)],
        host={"a", "b", "c"}, device={"a": 0, "c": 1}, hooks=[("device", "b", 1)],
        slots=2,
    ),
    Case(
        "tiers are inclusive: leaving host memory leaves the device first",
        [("admit", "a", 150, True), ("device", "a", 0), ("admit", "b", 150, True), ("admit", "c", 150, True)],
        host={"b", "c"}, device={}, hooks=[("device", "a", 0), ("host", "a")],
    ),
    Case(
        "a device-resident revision in use protects its host bytes too",
        [("admit", "a", 150, True), ("use", "a", None), ("device", "a", 0), ("admit", "b", 150, True),
         ("admit", "c", 150, True)],
        host={"a", "c"}, device={"a": 0}, hooks=[("host", "b")],
    ),
    Case(
        "explicit eviction is refused while in use, allowed once idle, and drops the pin",
        [("admit", "a", 10, True), ("device", "a", 0), ("pin", "a", None), ("use", "a", None),
         ("evict", "a", "adapter_in_use"), ("end", "a", None), ("evict", "a", None),
         ("admit", "b", 10, True)],
        host={"b"}, device={}, hooks=[("device", "a", 0), ("host", "a")],
    ),
    Case(
        "the byte budget is exact: filling it to the byte evicts nothing",
        [("admit", "a", 100, True), ("admit", "b", 200, True), ("admit", "c", 1, True)],
        host={"b", "c"}, device={}, hooks=[("host", "a")],
    ),
]


def run_script(case: Case) -> tuple[CachePolicy, RecordingHooks]:
    hooks = RecordingHooks()
    policy = CachePolicy(max_device_slots=case.slots, max_host_bytes=case.host_bytes, hooks=hooks)
    for step, (op, rid, *rest) in enumerate(case.script):
        expected = rest[-1]
        if op == "admit":
            got: Any = policy.admit_host(rid, rest[0])
        elif op == "device":
            got = policy.assign_device(rid)
        elif op == "evict":
            try:
                policy.evict(rid)
                got = None
            except Conflict as exc:
                got = exc.code
        else:
            got = {"use": policy.begin_use, "end": policy.end_use, "pin": policy.pin, "unpin": policy.unpin}[op](rid)
        assert got == expected, f"step {step} {op}({rid}) of {case.name!r}"
    return policy, hooks


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_policy_script(case: Case) -> None:
    policy, hooks = run_script(case)
    entries = {e.revision_id: e for e in policy.entries()}
    assert set(entries) == case.host
    assert {rid: e.slot for rid, e in entries.items() if e.slot is not None} == case.device
    assert hooks.calls == case.hooks
    assert policy.host_bytes <= case.host_bytes
    assert policy.device_used == len(case.device)


def test_budgets_hold_under_random_churn() -> None:
    """Many revisions of varied sizes, random uses and pins: the budgets hold at every step and
    a protected revision is never evicted."""
    import random

    rng = random.Random(3)
    hooks = RecordingHooks()
    policy = CachePolicy(max_device_slots=3, max_host_bytes=1000, hooks=hooks)
    in_use: dict[str, int] = {}
    for _ in range(3000):
        rid = f"r{rng.randrange(20)}"
        size = 50 + (int(rid[1:]) * 37) % 200
        action = rng.random()
        seen = len(hooks.calls)
        if action < 0.4:
            if policy.admit_host(rid, size) and rng.random() < 0.6:
                policy.assign_device(rid)
        elif action < 0.7:
            policy.begin_use(rid)
            in_use[rid] = in_use.get(rid, 0) + 1
        elif action < 0.9 and in_use.get(rid):
            policy.end_use(rid)
            in_use[rid] -= 1
        elif action < 0.95:
            policy.pin(rid)
        else:
            policy.unpin(rid)
        for call in hooks.calls[seen:]:
            assert not policy.protected(call[1]), f"{call} evicted a protected revision"
        assert policy.host_bytes <= 1000
        assert policy.device_used <= 3
        slots = [e.slot for e in policy.entries() if e.slot is not None]
        assert len(slots) == len(set(slots))


def test_misuse_is_refused() -> None:
    policy = CachePolicy(max_device_slots=1, max_host_bytes=100, hooks=RecordingHooks())
    with pytest.raises(InvalidRequest):
        policy.assign_device("absent")  # promotion to the device needs host memory first
    with pytest.raises(InvalidRequest):
        policy.end_use("never-used")
    with pytest.raises(LorafleetError) as info:
        policy.admit_host("huge", 101)
    assert info.value.code == "adapter_exceeds_host_tier"
    with pytest.raises(InvalidRequest):
        CachePolicy(max_device_slots=0, max_host_bytes=1, hooks=RecordingHooks())
