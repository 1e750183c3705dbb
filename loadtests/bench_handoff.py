"""Handoff benchmark: from "training produced new adapter weights" to "a replica answers with them".

A synthetic Qwen3-MoE base with random weights (``--params``, default 250M; about 1B is the
issue's size, at 4 GB of float32 per copy and three copies alive at once) is written in Hugging
Face layout. A replica (lorafleet's torch engine) serves it, and a trainer holds its own resident
copy. One rank-``--rank`` LoRA over attention and every expert's projections plays the freshly
trained adapter. Then, ``--reps`` times each:

  adapter path  export the packed bundle (``write_bundle``) → store it (``publish_revision`` to a
                local object store, verified) → warm it on the running replica (``engine.load``
                to the device tier, under admission control: fetch, verify, read, install) →
                flip (the pointer: an in-memory swap here; in production one database
                transaction and an event, milliseconds) → first answer (one greedy token)
  merged path   merge the LoRA into the trainer's resident base (W += s·B@A, every expert) →
                save the full model (safetensors, HF layout, plus config and tokenizer) → a
                replica reloads it (``load_base_model`` + a new engine) → first answer

The merged path is timed generously: no fingerprinting or registration of the new base, no copy
through an object store, and its reload reads files still in the page cache. Prints each step's
p50 and the end-to-end p50 of both, and the ratio (target: adapter path at least 20x faster).

Usage: python loadtests/bench_handoff.py [--params 250e6] [--reps 3] [--rank 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

HIDDEN, FFN, EXPERTS, TOP_K, HEADS, KV_HEADS, HEAD_DIM = 1024, 512, 32, 2, 16, 4, 64


def _layers_for(params: float, vocab: int) -> int:
    attn = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    per_layer = attn + EXPERTS * 3 * HIDDEN * FFN + EXPERTS * HIDDEN
    return max(1, round((params - 2 * vocab * HIDDEN) / per_layer))


def write_config(directory: Path, *, layers: int, vocab: int, eos: Any, pad: Any) -> None:
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=FFN,
        intermediate_size=FFN * 4,
        vocab_size=vocab,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    cfg.save_pretrained(str(directory))


def hf_state(model: Any) -> dict[str, torch.Tensor]:
    """Our CausalLM's weights under Hugging Face names, experts one tensor each (what transformers
    writes on save_pretrained; ``load_base_model`` maps them back)."""
    renames = {
        "input_norm.weight": "input_layernorm.weight",
        "post_attn_norm.weight": "post_attention_layernorm.weight",
        "mlp.router.weight": "mlp.gate.weight",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "inv_freq" or name.endswith(".inv_freq"):
            continue
        if name == "embed_tokens":
            out["model.embed_tokens.weight"] = tensor
        elif name == "lm_head":
            out["lm_head.weight"] = tensor
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor
        else:
            layer, rest = name.split(".", 2)[1], name.split(".", 2)[2]
            if rest.startswith("mlp.experts.") and rest.count(".") == 2:
                proj = rest.rsplit(".", 1)[1]
                for e in range(tensor.shape[0]):
                    out[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] = tensor[e]
            else:
                out[f"model.layers.{layer}.{renames.get(rest, rest)}"] = tensor
    return out


def save_model(model: Any, directory: Path, template: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hf_state(model).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", *TOKENIZER_FILES):
        if (template / name).exists() and template.resolve() != directory.resolve():
            shutil.copy2(template / name, directory / name)


@torch.no_grad()
def merge_into(model: Any, adapter: dict[str, torch.Tensor], scaling: float, sign: float = 1.0) -> None:
    """W += sign · scaling · B @ A for every LoRA module, in place (experts batched)."""
    params = model.state_dict(keep_vars=True)
    for key, a in adapter.items():
        if not key.endswith(".lora_A"):
            continue
        module = key.removesuffix(".lora_A")
        b = adapter[f"{module}.lora_B"]
        target = params.get(f"{module}.weight", params.get(module))
        if target is None:
            raise SystemExit(f"no base weight for {module}")
        delta = torch.bmm(b, a) if a.dim() == 3 else b @ a  # [E, out, in] or [out, in]
        target.add_(delta.to(target.dtype), alpha=sign * scaling)


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=250e6, help="target base parameters (default 250e6)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokenizer", type=Path, default=REPO / ".lorafleet" / "test-models" / "tiny-moe")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="lf-handoff-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    import transformers

    from lorafleet.adapters_store import BundleCache, ExpectedBase, RevisionRef, publish_revision
    from lorafleet.adapters_store.bundle import BundleMeta, write_bundle
    from lorafleet.adapters_store.objectstore import LocalObjectStore
    from lorafleet.platform.domain.lora import LoraConfig
    from lorafleet.platform.modeling import CausalLM, fingerprint, load_base_model, read_spec
    from lorafleet.services.serving.engine.base import AdapterHandle, GenerationRequest, SamplingOptions, Tier
    from lorafleet.services.serving.engine.torch_engine import TorchEngine

    if not (args.tokenizer / "tokenizer.json").exists():
        raise SystemExit(f"no tokenizer at {args.tokenizer}: run `make test-model` or pass --tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer))
    vocab = len(tokenizer)
    layers = _layers_for(args.params, vocab)

    # -- setup (not timed): the base on disk, the trainer's resident copy, a running replica --------
    t0 = time.perf_counter()
    base_dir = work / "base"
    base_dir.mkdir()
    write_config(base_dir, layers=layers, vocab=vocab, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy2(args.tokenizer / name, base_dir / name)
    spec, _ = read_spec(base_dir)
    gen = torch.Generator().manual_seed(0)
    trainer_model = CausalLM(spec, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for name, p in trainer_model.state_dict(keep_vars=True).items():
            if name.endswith("inv_freq"):
                continue
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    n_params = sum(t.numel() for k, t in trainer_model.state_dict().items() if not k.endswith("inv_freq"))
    save_model(trainer_model, base_dir, base_dir)
    fp = fingerprint(base_dir)
    expected = ExpectedBase(spec=spec, fingerprint=fp, max_lora_rank=max(16, args.rank))
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    print(
        f"synthetic Qwen3-MoE base: {n_params / 1e6:.1f}M parameters ({n_params:,}), float32, "
        f"{base_bytes / 2**30:.2f} GiB on disk; {layers} layers, hidden {HIDDEN}, {EXPERTS} experts "
        f"(top-{TOP_K}, ffn {FFN}), vocab {vocab}"
    )

    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    adapter: dict[str, torch.Tensor] = {}
    for key, shape in spec.lora_shapes(lora).items():
        scale = shape[-1] ** -0.5 if key.endswith("lora_A") else 0.02
        adapter[key] = (torch.randn(shape, generator=gen) * scale).contiguous()
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    print(
        f"adapter: rank {args.rank} on attention + every expert's gate/up/down, {len(adapter)} packed tensors, "
        f"{adapter_bytes / 2**20:.1f} MiB"
    )

    store = LocalObjectStore(work / "objects")

    def new_engine(model_dir: Path, cache_dir: Path) -> TorchEngine:
        model, spec_, tok = load_base_model(model_dir, dtype=torch.float32, device="cpu")
        cache = BundleCache(cache_dir, max_bytes=8 << 30, store=store, base=expected)
        return TorchEngine(
            model,
            spec_,
            tok,
            base_model_id="handoff-base",
            expected_base=expected,
            bundle_cache=cache,
            max_batch_rows=4,
            max_context=256,
            max_device_adapters=2,
            max_lora_rank=max(16, args.rank),
        )

    prompt = list(tokenizer.encode("hello, what is two plus two?"))

    async def first_token(engine: TorchEngine, handle: AdapterHandle | None) -> int:
        request = GenerationRequest(
            request_id="bench",
            prompt_ids=prompt,
            adapter=handle,
            sampling=SamplingOptions(max_tokens=1, temperature=0.0),
        )
        async for chunk in engine.generate(request):
            if chunk.token_ids:
                return chunk.token_ids[0]
        raise SystemExit("no token")

    replica = new_engine(base_dir, work / "replica-cache")
    print(f"setup: {time.perf_counter() - t0:.1f} s (not timed)\n")

    # -- adapter path ---------------------------------------------------------------------------------
    steps_a: dict[str, list[float]] = {k: [] for k in ("export", "store", "warm", "flip", "first_answer", "total")}
    pointer: dict[str, str] = {}
    adapter_tokens: list[int] = []

    async def adapter_path(i: int) -> None:
        marks = [time.perf_counter()]
        meta = BundleMeta(tenant_id="bench", policy_id="handoff", base_model_id="handoff-base", base_fingerprint=fp)
        bundle = work / "bundles" / meta.revision_id
        write_bundle(bundle, adapter, meta=meta, lora=lora)
        marks.append(time.perf_counter())
        published = publish_revision(store, bundle, base=expected)
        marks.append(time.perf_counter())
        handle = AdapterHandle(
            revision_id=published.revision_id,
            ref=RevisionRef(revision_id=published.revision_id, uri=published.uri, manifest_sha256=published.sha256),
            policy="handoff",
        )
        await replica.load(handle, tier=Tier.DEVICE, pin=True)
        marks.append(time.perf_counter())
        pointer["handoff"] = published.revision_id
        marks.append(time.perf_counter())
        adapter_tokens.append(await first_token(replica, handle))
        marks.append(time.perf_counter())
        for name, a, b in zip(steps_a, marks, marks[1:], strict=False):
            steps_a[name].append(b - a)
        steps_a["total"].append(marks[-1] - marks[0])
        replica.unpin(handle.revision_id)  # idle and unpinned: the next revision may take its slot

    async def adapter_reps() -> None:
        await replica.start()
        try:
            await first_token(replica, None)  # the replica is warm and serving before training ends
            for i in range(args.reps):
                await adapter_path(i)
        finally:
            await replica.stop()

    asyncio.run(adapter_reps())

    # -- merged path ----------------------------------------------------------------------------------
    steps_m: dict[str, list[float]] = {k: [] for k in ("merge", "save", "reload", "first_answer", "total")}
    merged_tokens: list[int] = []
    for i in range(args.reps):
        out = work / f"merged-{i}"
        marks = [time.perf_counter()]
        merge_into(trainer_model, adapter, lora.scaling)
        marks.append(time.perf_counter())
        save_model(trainer_model, out, base_dir)
        marks.append(time.perf_counter())
        engine = new_engine(out, work / f"merged-cache-{i}")

        async def answer(engine: TorchEngine = engine, marks: list[float] = marks) -> int:
            await engine.start()
            try:
                marks.append(time.perf_counter())
                return await first_token(engine, None)
            finally:
                await engine.stop()

        merged_tokens.append(asyncio.run(answer()))
        marks.append(time.perf_counter())
        for name, a, b in zip(steps_m, marks, marks[1:], strict=False):
            steps_m[name].append(b - a)
        steps_m["total"].append(marks[-1] - marks[0])
        merge_into(trainer_model, adapter, lora.scaling, sign=-1.0)  # back to the base (not timed)
        del engine
        shutil.rmtree(out, ignore_errors=True)

    # -- report ---------------------------------------------------------------------------------------
    def line(title: str, steps: dict[str, list[float]]) -> None:
        parts = ", ".join(f"{k} {p50(v):.3f}" for k, v in steps.items() if k != "total")
        reps = ", ".join(f"{x:.3f}" for x in steps["total"])
        print(f"{title:<13} p50 {p50(steps['total']):8.3f} s   ({parts})  [reps: {reps}]")

    print(f"handoff, training done → replica answers with the new weights, {args.reps} reps, p50 seconds:")
    line("adapter path", steps_a)
    line("merged path", steps_m)
    ratio = p50(steps_m["total"]) / p50(steps_a["total"])
    print(f"ratio merged/adapter: {ratio:.1f}x (target >= 20x: {'met' if ratio >= 20 else 'NOT met'})")
    print(
        f"first tokens agree (adapter on the fly vs merged weights): {adapter_tokens == merged_tokens} "
        f"{adapter_tokens} vs {merged_tokens}"
    )
    print(
        json.dumps(
            {
                "params": n_params,
                "adapter_p50_s": p50(steps_a["total"]),
                "merged_p50_s": p50(steps_m["total"]),
                "ratio": ratio,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
