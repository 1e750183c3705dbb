"""Adapter tiers inside a running TorchEngine: budgets under churn, in-use protection, deduplicated
loads, and the load / pin / evict operations the replica agent drives."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import Conflict, Unavailable
from lorafleet.services.serving.engine import GenerationChunk, SamplingOptions, Tier
from lorafleet.services.serving.engine.torch_engine import TorchEngine
from tests.services.serving.conftest import AdapterStore, EngineFactory, ServingBase
from tests.services.serving.test_engine import GREEDY, collect, prompts, reference_greedy, request, tokens


def load_count(stage: str, tier: str) -> float:
    value = metrics.REGISTRY.get_sample_value("lorafleet_adapter_load_seconds_count", {"stage": stage, "tier": tier})
    return value or 0.0


def test_budgets_hold_under_churn_and_outputs_stay_exact(
    make_engine: EngineFactory, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    adapters = serving_adapters.adapters
    sizes = sorted(a.nbytes for a in adapters)
    host_budget = sum(sizes[-3:])  # room for any three adapters, never for all six
    engine = make_engine(max_device_adapters=2, max_host_adapter_bytes=host_budget)
    ps = prompts(serving_base, 4)
    plan = [(ps[i % 4], adapters[i % len(adapters)]) for i in range(12)] + [(ps[0], None)]
    peaks = {"device": 0, "host_bytes": 0, "host": 0}

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            resident = engine.resident()
            device = [r for r in resident if r.tier == Tier.DEVICE]
            memory = [r for r in resident if r.tier in (Tier.DEVICE, Tier.HOST)]
            peaks["device"] = max(peaks["device"], len(device))
            peaks["host"] = max(peaks["host"], len(memory))
            peaks["host_bytes"] = max(peaks["host_bytes"], sum(r.bytes for r in memory))
            await asyncio.sleep(0.002)

    async def main() -> list[list[GenerationChunk]]:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        outs = await asyncio.gather(*(collect(engine, request(p, a.handle if a else None)) for p, a in plan))
        stop.set()
        await watcher
        return outs

    outs = asyncio.run(main())
    assert peaks["device"] == 2, "the churn never filled the device tier"
    assert peaks["host"] >= 3
    assert peaks["host_bytes"] <= host_budget
    assert any(o[0].adapter_wait_seconds > 0 for o in outs)
    for (p, a), out in zip(plan, outs, strict=True):
        assert tokens(out) == reference_greedy(serving_base, p, GREEDY.max_tokens, a)


def test_in_use_adapter_is_never_evicted(
    make_engine: EngineFactory, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    a, b = serving_adapters.adapters[0], serving_adapters.adapters[1]
    engine = make_engine(max_device_adapters=1, max_context=4096, adapter_wait_seconds=0.3)
    prompt = prompts(serving_base, 1)[0]
    long = SamplingOptions(max_tokens=4000, temperature=0.0, ignore_eos=True)

    async def main() -> None:
        running = engine.generate(request(prompt, a.handle, long))
        first = await running.__anext__()
        # The only device slot serves a running request: b waits, then is refused; a is untouched.
        with pytest.raises(Unavailable) as info:
            await collect(engine, request(prompt, b.handle))
        assert info.value.code == "adapter_slots_busy"
        with pytest.raises(Conflict) as conflict:
            await engine.evict(a.handle.revision_id)
        assert conflict.value.code == "adapter_in_use"
        state = {r.revision_id: r for r in engine.resident()}
        assert state[a.handle.revision_id].tier == Tier.DEVICE and state[a.handle.revision_id].in_flight == 1
        got = first.token_ids + (await running.__anext__()).token_ids
        await running.aclose()
        expected = reference_greedy(serving_base, prompt, len(got), a)
        assert got == expected
        # Once a's request is gone, b takes the slot.
        out = await collect(engine, request(prompt, b.handle))
        assert tokens(out) == reference_greedy(serving_base, prompt, GREEDY.max_tokens, b)
        state = {r.revision_id: r.tier for r in engine.resident()}
        assert state == {a.handle.revision_id: Tier.HOST, b.handle.revision_id: Tier.DEVICE}

    asyncio.run(main())


def test_host_budget_full_of_in_use_adapters_refuses_without_evicting(
    make_engine: EngineFactory, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    a, b = serving_adapters.adapters[0], serving_adapters.adapters[3]  # both rank 8: equal sizes
    engine = make_engine(max_host_adapter_bytes=a.nbytes, max_context=4096, adapter_wait_seconds=0.3)
    prompt = prompts(serving_base, 1)[0]

    async def main() -> None:
        endless = SamplingOptions(max_tokens=4000, temperature=0.0, ignore_eos=True)
        running = engine.generate(request(prompt, a.handle, endless))
        await running.__anext__()
        with pytest.raises(Unavailable) as info:
            await collect(engine, request(prompt, b.handle))
        assert info.value.code == "adapter_host_busy"
        assert [r.revision_id for r in engine.resident() if r.tier != Tier.DISK] == [a.handle.revision_id]
        await running.aclose()
        await collect(engine, request(prompt, b.handle))
        assert [r.revision_id for r in engine.resident() if r.tier != Tier.DISK] == [b.handle.revision_id]

    asyncio.run(main())


def test_concurrent_requests_for_a_cold_revision_share_one_load(
    torch_engine: TorchEngine, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    adapter = serving_adapters.adapters[4]
    before = {s: load_count(s, t) for s, t in (("fetch", "remote"), ("read", "disk"), ("install", "host"))}
    prompt = prompts(serving_base, 1)[0]

    async def main() -> list[list[GenerationChunk]]:
        return await asyncio.gather(*(collect(torch_engine, request(prompt, adapter.handle)) for _ in range(6)))

    outs = asyncio.run(main())
    after = {s: load_count(s, t) for s, t in (("fetch", "remote"), ("read", "disk"), ("install", "host"))}
    assert {s: after[s] - before[s] for s in after} == {"fetch": 1, "read": 1, "install": 1}
    assert len({tuple(tokens(o)) for o in outs}) == 1
    assert all(o[0].adapter_wait_seconds > 0 for o in outs)  # each waited for the one shared load


def test_load_pin_unpin_evict(
    make_engine: EngineFactory, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    a, b, c = (serving_adapters.adapters[i] for i in (0, 1, 2))
    engine = make_engine(max_device_adapters=1)
    prompt = prompts(serving_base, 1)[0]

    async def main() -> None:
        report = await engine.load(a.handle, tier=Tier.DISK)
        assert set(report.seconds) == {"fetch"} and not report.already_resident
        assert {r.revision_id: r.tier for r in engine.resident()} == {a.handle.revision_id: Tier.DISK}
        report = await engine.load(a.handle, tier=Tier.HOST)
        assert set(report.seconds) == {"fetch", "read"}
        report = await engine.load(a.handle, tier=Tier.DEVICE, pin=True)
        assert set(report.seconds) == {"install"}
        again = await engine.load(a.handle, tier=Tier.DEVICE)
        assert again.already_resident
        state = {r.revision_id: r for r in engine.resident()}
        assert state[a.handle.revision_id].tier == Tier.DEVICE and state[a.handle.revision_id].pinned
        # A warmed revision costs its first request no load time.
        out = await collect(engine, request(prompt, a.handle))
        assert out[0].adapter_wait_seconds == 0.0
        # The pinned revision holds the only slot: b can reach host memory but not the device...
        await engine.load(b.handle, tier=Tier.HOST)
        engine.tiers.wait_seconds = 0.2
        with pytest.raises(Unavailable):
            await engine.load(b.handle, tier=Tier.DEVICE)
        # ...until it is unpinned.
        engine.unpin(a.handle.revision_id)
        await engine.load(b.handle, tier=Tier.DEVICE)
        state = {r.revision_id: r.tier for r in engine.resident()}
        assert state[a.handle.revision_id] == Tier.HOST and state[b.handle.revision_id] == Tier.DEVICE
        await engine.evict(b.handle.revision_id)
        await engine.load(c.handle, tier=Tier.HOST)
        state = {r.revision_id: r.tier for r in engine.resident()}
        expected = {a.handle.revision_id: Tier.HOST, b.handle.revision_id: Tier.DISK, c.handle.revision_id: Tier.HOST}
        assert state == expected
        metrics_device = metrics.REGISTRY.get_sample_value(
            "lorafleet_resident_adapters", {"replica": "local", "tier": "device"}
        )
        assert metrics_device == 0

    asyncio.run(main())
