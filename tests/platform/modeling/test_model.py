"""CausalLM against transformers' own implementations, and KV-cache decoding against full forwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from lorafleet.platform.domain.errors import InvalidRequest, Unavailable
from lorafleet.platform.modeling import CausalLM, KVCache, load_base_model

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "intermediate_size": 96,
    # Larger than the 0.02 default so logits and routing are far from uniform and a wrong
    # mapping cannot hide under the tolerance.
    "initializer_range": 0.15,
}

TINY_CONFIGS: dict[str, Any] = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_COMMON,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    ),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16),
    "qwen3_tied": lambda: transformers.Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=True),
    "llama": lambda: transformers.LlamaConfig(**_COMMON, rope_theta=500000.0),
    "mixtral": lambda: transformers.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(
        **_COMMON, num_experts=8, num_experts_per_tok=2, eos_token_id=0
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_COMMON,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
    ),
}


def save_tiny(kind: str, directory: Path, *, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random transformers model of ``kind``, saved to ``directory``; returns it (eval)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](), dtype=torch.float32)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in TINY_CONFIGS:
        out[kind] = tmp_path_factory.mktemp(kind)
        save_tiny(kind, out[kind])
    return out


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_logits_equal_transformers(kind: str, tiny_dirs: dict[str, Path]) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[kind], dtype=torch.float32).eval()
    model, spec, tokenizer = load_base_model(tiny_dirs[kind])
    assert spec.model_type == reference.config.model_type and tokenizer is None
    assert list(model.parameters()) == [], "base weights must be frozen buffers"
    ids, mask = _batch()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        got = model(ids, mask)
        got_unpadded = model(ids[:1])
    real = mask.bool()
    assert expected.abs().max() > 1.0  # a meaningful comparison, not near-zero logits
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_unpadded, expected[:1], atol=1e-5, rtol=1e-5)


def test_spec_sites_follow_config(tiny_dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(tiny_dirs["qwen2_moe"])
    assert spec.moe_layers == (0,)
    assert type(model.layers[0].mlp).__name__ == "SparseMoE"
    assert type(model.layers[1].mlp).__name__ == "DenseMLP"
    tied, _, _ = load_base_model(tiny_dirs["qwen3_tied"])
    assert tied.lm_head is None


def _full_logits(model: CausalLM, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0]  # [T, V]


@pytest.mark.parametrize("kind", ["qwen3_moe", "llama"])
def test_cached_decoding_equals_full_forward(kind: str, tiny_dirs: dict[str, Path]) -> None:
    """Prefills of different lengths in one step, decodes, a request joining mid-way (its
    prefill mixed with decode rows), one leaving and its slot reused by a newcomer."""
    model, spec, _ = load_base_model(tiny_dirs[kind])
    cache = KVCache(spec, max_slots=3, max_len=32)
    g = torch.Generator().manual_seed(7)
    seqs = {
        name: torch.randint(0, 256, (n,), generator=g).tolist()
        for name, n in {"a": 12, "b": 14, "c": 13, "d": 10}.items()
    }
    prompt = {"a": 5, "b": 9, "c": 3, "d": 6}
    slot: dict[str, int] = {}
    done = {name: 0 for name in seqs}  # tokens already in the cache

    def step(names: list[str]) -> None:
        chunks = [seqs[n][done[n] : (prompt[n] if done[n] == 0 else done[n] + 1)] for n in names]
        width = max(len(c) for c in chunks)
        ids = torch.tensor([c + [0] * (width - len(c)) for c in chunks])
        with torch.no_grad():
            logits = model.step(
                ids, cache=cache, slots=[slot[n] for n in names], num_tokens=[len(c) for c in chunks]
            )
        for row, (name, chunk) in enumerate(zip(names, chunks, strict=True)):
            expected = _full_logits(model, seqs[name][: done[name] + len(chunk)])[done[name] :]
            torch.testing.assert_close(logits[row, : len(chunk)], expected, atol=1e-5, rtol=1e-5)
            done[name] += len(chunk)
            assert cache.length(slot[name]) == done[name]

    slot["a"], slot["b"] = cache.acquire(), cache.acquire()
    step(["a", "b"])  # two prefills, lengths 5 and 9
    step(["a", "b"])
    slot["c"] = cache.acquire()
    step(["b", "c", "a"])  # c's prefill mixed with decodes, rows in a new order
    step(["c", "a", "b"])
    cache.release(slot["a"])
    slot["d"] = cache.acquire()  # reuses a's slot: stale K/V beyond d's length must be masked
    assert slot["d"] == slot["a"]
    step(["d", "c"])
    step(["c", "d", "b"])
    with torch.no_grad():
        last = model.step(
            torch.tensor([[seqs["d"][done["d"]]], [seqs["b"][done["b"]]]]),
            cache=cache,
            slots=[slot["d"], slot["b"]],
            last_only=True,
        )
    torch.testing.assert_close(
        last[0], _full_logits(model, seqs["d"][: done["d"] + 1])[-1], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        last[1], _full_logits(model, seqs["b"][: done["b"] + 1])[-1], atol=1e-5, rtol=1e-5
    )


def test_cache_refuses_overflow_and_double_use(tiny_dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(tiny_dirs["llama"])
    cache = KVCache(spec, max_slots=1, max_len=4)
    slot = cache.acquire()
    with pytest.raises(Unavailable):
        cache.acquire()
    with pytest.raises(InvalidRequest) as info, torch.no_grad():
        model.step(torch.zeros(1, 5, dtype=torch.long), cache=cache, slots=[slot])
    assert info.value.code == "context_length_exceeded"
    assert cache.length(slot) == 0  # a refused step writes nothing
    with pytest.raises(InvalidRequest):
        cache.plan([slot, slot], [1, 1], width=1)
    cache.release(slot)
    with pytest.raises(InvalidRequest):
        cache.release(slot)
