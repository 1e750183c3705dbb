"""TorchEngine: mixed-adapter continuous batching is exact, sampling is per request, text ends right,
and a request's resources are freed however it ends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import torch

from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import InvalidRequest, LorafleetError
from lorafleet.platform.modeling import CausalLM, DeviceAdapterBank, LoraBatch
from lorafleet.services.serving.engine import (
    AdapterHandle,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
)
from lorafleet.services.serving.engine.torch_engine import TorchEngine
from tests.services.serving.conftest import (
    AdapterStore,
    EngineFactory,
    PublishedAdapter,
    ServingBase,
    publish_adapter,
)

GREEDY = SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True)


def request(
    prompt: Sequence[int], adapter: AdapterHandle | None = None, sampling: SamplingOptions = GREEDY, rid: str = "r"
) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=list(prompt), adapter=adapter, sampling=sampling)


async def collect(engine: TorchEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(req)]


def tokens(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def prompts(base: ServingBase, n: int) -> list[list[int]]:
    """n different prompts of different lengths (3..3+n tokens)."""
    g = torch.Generator().manual_seed(7)
    vocab = base.spec.vocab_size
    return [torch.randint(0, vocab, (3 + i,), generator=g).tolist() for i in range(n)]


@torch.no_grad()
def reference_greedy(base: ServingBase, prompt: list[int], n: int, adapter: PublishedAdapter | None) -> list[int]:
    """Greedy decoding by full forwards (no KV cache, no batching), with the adapter in a bank of one."""
    model: CausalLM = base.model
    lora = None
    if adapter is not None:
        bank = DeviceAdapterBank(base.spec, capacity=1, max_rank=adapter.lora.rank)
        bank.load(0, adapter.tensors, scaling=adapter.lora.scaling)
        lora = LoraBatch(bank.bank, [0])
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), lora=lora)[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def distinct_adapter_steps() -> float:
    """Engine steps so far that mixed at least two different adapters."""
    get = metrics.REGISTRY.get_sample_value
    count = get("lorafleet_batch_distinct_adapters_count") or 0.0
    at_most_one = get("lorafleet_batch_distinct_adapters_bucket", {"le": "1.0"}) or 0.0
    return count - at_most_one


def test_engine_satisfies_protocol(torch_engine: TorchEngine) -> None:
    assert isinstance(torch_engine, Engine)


@pytest.mark.parametrize(
    "config",
    [{}, {"max_prefill_tokens": 4, "max_batch_rows": 3}],
    ids=["one-step-prefill", "chunked-prefill-and-queueing"],
)
def test_mixed_batch_equals_solo_runs_and_reference(
    make_engine: EngineFactory, config: dict[str, int], serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    torch_engine = make_engine(**config)
    adapters = serving_adapters.adapters
    # (prompt, adapter): base rows and four adapters of three ranks; one adapter used twice.
    chosen = [None, adapters[0], adapters[1], None, adapters[2], adapters[0], adapters[3], None]
    plan: list[tuple[list[int], PublishedAdapter | None]] = list(zip(prompts(serving_base, 8), chosen, strict=True))

    async def solo() -> list[list[int]]:
        return [tokens(await collect(torch_engine, request(p, a.handle if a else None))) for p, a in plan]

    async def mixed() -> list[list[int]]:
        started = asyncio.Event()
        results: dict[int, list[int]] = {}

        async def run(i: int) -> None:
            p, a = plan[i]
            out: list[int] = []
            async for chunk in torch_engine.generate(request(p, a.handle if a else None, rid=f"m{i}")):
                out += chunk.token_ids
                if i == 0 and len(out) >= 3:
                    started.set()
            results[i] = out

        async def late(i: int) -> None:
            await started.wait()  # joins while the first wave is decoding
            await run(i)

        await asyncio.gather(*(run(i) for i in range(5)), *(late(i) for i in range(5, 8)))
        return [results[i] for i in range(8)]

    alone = asyncio.run(solo())
    before = distinct_adapter_steps()
    together = asyncio.run(mixed())
    assert distinct_adapter_steps() > before, "no step mixed two adapters: the test would prove nothing"
    assert together == alone
    for (p, a), got in zip(plan, together, strict=True):
        assert got == reference_greedy(serving_base, p, GREEDY.max_tokens, a)
    # The adapters change the output (else equality with the base would be vacuous).
    base_out = reference_greedy(serving_base, plan[1][0], GREEDY.max_tokens, None)
    assert together[1] != base_out


def test_seeded_sampling_does_not_depend_on_batch(
    torch_engine: TorchEngine, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    adapter = serving_adapters.adapters[1].handle
    ps = prompts(serving_base, 6)
    sampled = SamplingOptions(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)

    async def main() -> tuple[list[int], list[int], list[int]]:
        alone = tokens(await collect(torch_engine, request(ps[0], adapter, sampled)))
        neighbours = [None, adapter, None, serving_adapters.adapters[0].handle]
        others = [
            request(p, a, SamplingOptions(max_tokens=16, temperature=1.0, seed=i, ignore_eos=True))
            for i, (p, a) in enumerate(zip(ps[1:], neighbours, strict=False))
        ]
        outs = await asyncio.gather(
            collect(torch_engine, request(ps[0], adapter, sampled)), *(collect(torch_engine, r) for r in others)
        )
        reseeded = tokens(
            await collect(torch_engine, request(ps[0], adapter, sampled.model_copy(update={"seed": 99})))
        )
        return alone, tokens(outs[0]), reseeded

    alone, in_batch, reseeded = asyncio.run(main())
    assert in_batch == alone
    assert reseeded != alone
    # top_k=1 is greedy whatever the temperature and seed.
    topk1 = SamplingOptions(max_tokens=8, temperature=1.5, top_k=1, seed=5, ignore_eos=True)
    greedy = SamplingOptions(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def compare() -> tuple[list[int], list[int]]:
        a = tokens(await collect(torch_engine, request(ps[2], adapter, topk1)))
        b = tokens(await collect(torch_engine, request(ps[2], adapter, greedy)))
        return a, b

    a, b = asyncio.run(compare())
    assert a == b


def test_stop_strings_stop_tokens_max_tokens_and_usage(torch_engine: TorchEngine, serving_base: ServingBase) -> None:
    tok = serving_base.tokenizer
    prompt = prompts(serving_base, 1)[0]
    long = SamplingOptions(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def run(sampling: SamplingOptions) -> list[GenerationChunk]:
        return await collect(torch_engine, request(prompt, None, sampling))

    full = asyncio.run(run(long))
    full_ids = tokens(full)
    full_text = "".join(c.text for c in full)
    assert full[-1].finish_reason == "length"
    assert full[-1].completion_tokens == 24 == len(full_ids)
    assert full[-1].prompt_tokens == len(prompt)
    assert full_text == tok.decode(full_ids, skip_special_tokens=True)

    # A stop string that straddles a token boundary: the tail of token 4's text + the head of token 5's.
    pieces = [tok.decode(full_ids[:i], skip_special_tokens=True) for i in range(len(full_ids) + 1)]
    cut = next(
        i for i in range(4, 20) if len(pieces[i]) - len(pieces[i - 1]) >= 1 and len(pieces[i + 1]) - len(pieces[i]) >= 1
    )
    stop = pieces[i + 1][len(pieces[cut]) - 1 : len(pieces[cut]) + 1] if (i := cut) else ""
    assert len(stop) == 2
    first = full_text.find(stop)
    out = asyncio.run(run(long.model_copy(update={"stop": ("never-appears", stop)})))
    text = "".join(c.text for c in out)
    assert out[-1].finish_reason == "stop"
    assert text == full_text[:first]
    assert stop not in text
    assert out[-1].completion_tokens == len(tokens(out)) <= cut + 1
    for chunk in out:  # streamed text never shows a prefix that later turned into the stop string
        assert not chunk.text.endswith(stop[0]) or text.endswith(stop[0])

    # A stop token: counted in usage, not rendered.
    third = full_ids[2]
    out = asyncio.run(run(long.model_copy(update={"stop_token_ids": (third,)})))
    assert out[-1].finish_reason == "stop"
    assert tokens(out) == full_ids[: full_ids.index(third) + 1]
    assert out[-1].completion_tokens == full_ids.index(third) + 1
    assert "".join(c.text for c in out) == tok.decode(full_ids[: full_ids.index(third)], skip_special_tokens=True)

    # EOS ends generation unless ignore_eos.
    eos = torch_engine.eos_token_ids
    assert eos, "the base's tokenizer names an EOS token"
    out = asyncio.run(run(SamplingOptions(max_tokens=5, temperature=0.0)))
    assert out[-1].finish_reason in ("length", "stop")
    assert out[-1].completion_tokens == len(tokens(out)) <= 5


def test_context_limit_and_bad_prompts_are_refused(torch_engine: TorchEngine, serving_base: ServingBase) -> None:
    limit = torch_engine.max_context

    async def first(req: GenerationRequest) -> None:
        async for _ in torch_engine.generate(req):
            break

    too_long = request([1] * (limit - 10), None, SamplingOptions(max_tokens=11))
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(first(too_long))
    assert info.value.code == "context_length_exceeded"
    assert str(limit) in info.value.message
    asyncio.run(first(request([1] * (limit - 10), None, SamplingOptions(max_tokens=10, temperature=0))))
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(first(request([], None)))
    assert info.value.code == "empty_prompt"
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(first(request([serving_base.spec.vocab_size], None)))
    assert info.value.code == "invalid_token_id"


def test_abort_frees_kv_slot_and_adapter(
    make_engine: EngineFactory, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    engine = make_engine(max_batch_rows=2)
    adapter = serving_adapters.adapters[0].handle
    endless = SamplingOptions(max_tokens=200, temperature=0.0, ignore_eos=True)
    prompt = prompts(serving_base, 1)[0]

    async def main() -> None:
        # Two rows fill both KV slots; close one stream and cancel the other mid-generation.
        gen = engine.generate(request(prompt, adapter, endless))
        await gen.__anext__()
        await gen.__anext__()

        async def consume() -> None:
            async for _ in engine.generate(request(prompt, None, endless)):
                pass

        task = asyncio.create_task(consume())
        while engine.load_factor()[0] < 2:
            await asyncio.sleep(0.01)
        await gen.aclose()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.load_factor() == (0, 0) and all(r.in_flight == 0 for r in engine.resident()):
                break
            await asyncio.sleep(0.01)
        assert engine.load_factor() == (0, 0)
        assert [r.in_flight for r in engine.resident() if r.revision_id == adapter.revision_id] == [0]
        # Both slots are free again: two new requests run at once and finish.
        outs = await asyncio.gather(*(collect(engine, request(prompt, adapter, GREEDY)) for _ in range(2)))
        assert all(o[-1].finish_reason == "length" for o in outs)
        # The adapter is evictable now that nothing uses it.
        await engine.evict(adapter.revision_id)
        assert adapter.revision_id not in {r.revision_id for r in engine.resident() if r.tier != "disk"}

    asyncio.run(main())


def test_corrupted_bundle_is_refused_and_others_keep_serving(
    torch_engine: TorchEngine, serving_base: ServingBase, serving_adapters: AdapterStore
) -> None:
    store = serving_adapters.store
    good = serving_adapters.adapters[2].handle
    # A revision whose tensor bytes were damaged in the object store after it was published.
    victim = publish_adapter(store, serving_base, serving_adapters.workdir, policy="pol-corrupt", rank=2, seed=5)
    data = next(
        p for p in store.root.rglob("*.data") if victim.handle.revision_id in str(p) and p.stat().st_size > 1000
    )
    raw = bytearray(data.read_bytes())
    raw[-100] ^= 0xFF
    data.write_bytes(bytes(raw))
    # And one published for another base (its manifest names a different fingerprint).
    foreign = publish_adapter(
        store, serving_base, serving_adapters.workdir, policy="pol-foreign", rank=2, seed=6, base_fingerprint="ef" * 32
    )
    prompt = prompts(serving_base, 1)[0]

    async def main() -> tuple[list[BaseException | list[GenerationChunk]], list[int]]:
        expected = tokens(await collect(torch_engine, request(prompt, good)))
        outs = await asyncio.gather(
            collect(torch_engine, request(prompt, victim.handle)),
            collect(torch_engine, request(prompt, foreign.handle)),
            collect(torch_engine, request(prompt, good)),
            collect(torch_engine, request(prompt, None)),
            return_exceptions=True,
        )
        return list(outs), expected

    outs, expected = asyncio.run(main())
    corrupt_error, foreign_error, good_out, base_out = outs
    assert isinstance(corrupt_error, LorafleetError) and corrupt_error.code == "checksum_mismatch"
    assert isinstance(foreign_error, LorafleetError) and foreign_error.code == "base_fingerprint_mismatch"
    assert isinstance(good_out, list) and tokens(good_out) == expected
    assert isinstance(base_out, list) and base_out[-1].finish_reason == "length"
    resident = {r.revision_id for r in torch_engine.resident()}
    assert victim.handle.revision_id not in resident and foreign.handle.revision_id not in resident


@pytest.mark.parametrize("budget", [None, 10.0], ids=["unpaced", "paced"])
def test_decode_latency_reaches_the_admission_pacer_only_when_pacing(
    make_engine: EngineFactory, serving_base: ServingBase, budget: float | None
) -> None:
    engine = make_engine(step_latency_budget_seconds=budget)
    asyncio.run(collect(engine, request(prompts(serving_base, 1)[0])))  # 12 tokens: 11 inter-token gaps
    if budget is None:
        assert engine.admission.pacer is None
    else:
        assert engine.admission.pacer is not None
        recent = engine.admission.pacer.recent()
        assert recent is not None and 0.0 < recent < budget
