"""Small architectures and bundle builders shared by the adapter-store tests."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch

from lorafleet.adapters_store.bundle import (
    BundleManifest,
    BundleMeta,
    ExpectedBase,
    random_adapter,
    write_bundle,
)
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import LoraConfig

# A small Qwen3-MoE: layer 0 dense (exercises mlp.*), layers 1-2 routed MoE with 8 experts.
TINY_MOE_HF: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "mlp_only_layers": [0],
    "vocab_size": 128,
}
DENSE_HF: dict[str, Any] = {
    "model_type": "qwen3",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 128,
}
FINGERPRINT = "ab" * 32
OTHER_FINGERPRINT = "cd" * 32


def spec_of(hf: dict[str, Any]) -> ArchitectureSpec:
    return ArchitectureSpec.from_hf_config(hf)


def base_of(hf: dict[str, Any], *, max_rank: int = 8, fingerprint: str = FINGERPRINT) -> ExpectedBase:
    return ExpectedBase(spec=spec_of(hf), fingerprint=fingerprint, max_lora_rank=max_rank)


def meta(**overrides: Any) -> BundleMeta:
    fields: dict[str, Any] = {
        "tenant_id": "ten-a",
        "policy_id": "pol-a",
        "base_model_id": "tiny",
        "base_fingerprint": FINGERPRINT,
    }
    fields.update(overrides)
    return BundleMeta(**fields)


def make_bundle(
    out_dir: Path,
    hf: dict[str, Any] = TINY_MOE_HF,
    *,
    rank: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    tensors: dict[str, torch.Tensor] | None = None,
    **meta_overrides: Any,
) -> tuple[BundleManifest, dict[str, torch.Tensor]]:
    lora = LoraConfig(rank=rank, alpha=16.0)
    if tensors is None:
        tensors = random_adapter(spec_of(hf), lora, dtype=dtype, seed=seed)
    manifest = write_bundle(out_dir, tensors, meta=meta(**meta_overrides), lora=lora)
    return manifest, tensors


def bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (bit-identity, NaN-safe)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def write_raw_safetensors(path: Path, header_json: str, data: bytes) -> None:
    """A safetensors file from hand-written header text (e.g. one naming a tensor twice)."""
    raw = header_json.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
