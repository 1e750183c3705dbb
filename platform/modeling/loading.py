"""Load a base model from a local Hugging Face model directory, and fingerprint it.

Reads ``config.json`` and ``*.safetensors`` (one file or shards with
``model.safetensors.index.json``) with ``safe_open``; maps the weight names of qwen3_moe, qwen3,
llama, mixtral, olmoe and qwen2_moe onto :class:`CausalLM`'s. Routed experts are accepted in
both on-disk layouts: per expert (``mlp.experts.{e}.gate_proj.weight``, Mixtral's
``block_sparse_moe.experts.{e}.w1/w2/w3``, what transformers 5 writes on ``save_pretrained``)
and fused (``mlp.experts.gate_up_proj [E, 2*ffn, hidden]`` + ``down_proj [E, hidden, ffn]``,
its in-memory form).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor

from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.modeling.model import CausalLM

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_FINGERPRINT_SIDECAR = ".lorafleet-fingerprint.json"
_CHUNK = 8 << 20

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED_RE = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)(?:\.weight)?$")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_RENAMES = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "block_sparse_moe.gate.weight": "mlp.router.weight",
}


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidRequest(f"no *.safetensors weights in {path}", code="base_model_unreadable")
    return files


def read_spec(path: str | os.PathLike[str]) -> tuple[ArchitectureSpec, dict[str, Any]]:
    """The architecture of a model directory, refusing what :class:`CausalLM` would compute wrong."""
    config_path = Path(path) / "config.json"
    if not config_path.exists():
        raise InvalidRequest(f"{config_path} does not exist", code="base_model_unreadable")
    cfg: dict[str, Any] = json.loads(config_path.read_text())
    spec = ArchitectureSpec.from_hf_config(cfg)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    unsupported = []
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg['hidden_act']}")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope_type={rope.get('rope_type', rope.get('type'))}")
    if cfg.get("clip_qkv") is not None:
        unsupported.append("clip_qkv")
    if cfg.get("use_sliding_window") or (spec.model_type == "mixtral" and cfg.get("sliding_window")):
        unsupported.append("sliding window attention")
    if cfg.get("mlp_bias"):
        unsupported.append("mlp_bias")
    if unsupported:
        raise InvalidRequest(
            f"unsupported model features: {', '.join(unsupported)}", code="unsupported_architecture"
        )
    return spec, cfg


def _our_name(hf_name: str) -> tuple[str, int | None] | None:
    """HF name -> (our state_dict name, expert index or None); None for ignorable tensors.

    Fused expert tensors map to ``layers.{i}.mlp.experts.{gate_up_proj|down_proj}``.
    """
    name = hf_name.removeprefix("model.")
    if name in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        return {
            "embed_tokens.weight": "embed_tokens",
            "norm.weight": "norm.weight",
            "lm_head.weight": "lm_head",
        }[name], None
    match = _LAYER_RE.match(name)
    if match is None:
        raise InvalidRequest(f"unrecognised weight {hf_name!r}", code="base_model_unreadable")
    layer, rest = match.groups()
    if rest.endswith("rotary_emb.inv_freq"):
        return None
    expert = _EXPERT_RE.match(rest)
    if expert is not None:
        e, proj = expert.groups()
        return f"layers.{layer}.mlp.experts.{_MIXTRAL_EXPERT.get(proj, proj)}", int(e)
    fused = _FUSED_RE.match(rest)
    if fused is not None:
        return f"layers.{layer}.mlp.experts.{fused.group(1)}", None
    return f"layers.{layer}.{_RENAMES.get(rest, rest)}", None


def _tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield key, handle.get_tensor(key)


@torch.no_grad()
def load_base_model(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[CausalLM, ArchitectureSpec, PreTrainedTokenizerBase | None]:
    """Build a :class:`CausalLM` from a local Hugging Face directory.

    Returns ``(model, spec, tokenizer)``; tokenizer is None when the directory has no tokenizer
    files. Every tensor the model needs must be present exactly once, and every tensor in the
    files must be recognised, or :class:`InvalidRequest` (``base_model_unreadable``) is raised.
    """
    root = Path(path)
    spec, cfg = read_spec(root)
    qkv_bias = bool(cfg.get("qkv_bias", True)) if spec.model_type == "qwen2_moe" else None
    model = CausalLM(spec, dtype=dtype, device=device, qkv_bias=qkv_bias)
    state = model.state_dict(keep_vars=True)
    filled: set[tuple[str, int | None]] = set()

    def put(name: str, expert: int | None, tensor: Tensor) -> None:
        target = state.get(name)
        if target is None:
            raise InvalidRequest(
                f"weight {name!r} does not fit a {spec.model_type} model of this config",
                code="base_model_unreadable",
            )
        dest = target if expert is None else target[expert]
        if tuple(dest.shape) != tuple(tensor.shape):
            raise InvalidRequest(
                f"weight {name}{'' if expert is None else f'[{expert}]'} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(dest.shape)}",
                code="base_model_unreadable",
            )
        if (name, expert) in filled:
            raise InvalidRequest(f"weight {name} appears twice", code="base_model_unreadable")
        dest.copy_(tensor.to(dtype))
        filled.add((name, expert))

    for hf_name, tensor in _tensors(_weight_files(root)):
        mapped = _our_name(hf_name)
        if mapped is None:
            continue
        name, expert = mapped
        if name == "lm_head" and spec.tie_word_embeddings:
            continue  # some tied checkpoints still write the (identical) head
        if name.endswith("experts.gate_up_proj"):
            # Fused [E, 2*ffn, hidden]: the first ffn output rows are the gate (chunk order).
            gate, up = tensor.chunk(2, dim=1)
            base = name.removesuffix("gate_up_proj")
            for e in range(tensor.shape[0]):
                put(f"{base}gate_proj", e, gate[e])
                put(f"{base}up_proj", e, up[e])
            continue
        if name.endswith("experts.down_proj") and expert is None:
            for e in range(tensor.shape[0]):
                put(name, e, tensor[e])
            continue
        put(name, expert, tensor)

    missing = []
    for name, buf in state.items():
        if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
            missing += [f"{name}[{e}]" for e in range(buf.shape[0]) if (name, e) not in filled]
        elif (name, None) not in filled and name != "inv_freq":
            missing.append(name)
    if missing:
        raise InvalidRequest(
            f"{len(missing)} weights missing from {root}, e.g. {missing[:3]}", code="base_model_unreadable"
        )
    return model.eval(), spec, _load_tokenizer(root)


def _load_tokenizer(root: Path) -> PreTrainedTokenizerBase | None:
    """The directory's tokenizer: AutoTokenizer when tokenizer_config.json names its class, else
    the bare tokenizer.json as written (AutoTokenizer would pick a class from config.json's
    model_type and rebuild the vocabulary its own way, mangling a project-made tokenizer)."""
    has_config, has_json = (root / "tokenizer_config.json").exists(), (root / "tokenizer.json").exists()
    if not (has_config or has_json):
        return None
    # transformers is heavy to import; only when there is a tokenizer to load.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer: PreTrainedTokenizerBase
    if has_config:
        tokenizer = AutoTokenizer.from_pretrained(str(root))
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
    return tokenizer


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 (64 hex chars) over config.json and every weight file's bytes, in name order.

    Each file contributes its name, length and content, so moving bytes between shards changes
    the digest. The result is cached in a sidecar file keyed by every file's size and mtime, so
    a multi-gigabyte base is hashed once; a read-only directory just skips the cache.
    """
    root = Path(path)
    files = [root / "config.json", *_weight_files(root)]
    stats = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    sidecar = root / _FINGERPRINT_SIDECAR
    if sidecar.exists():
        try:
            cached = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            cached = {}
        if cached.get("files") == stats and isinstance(cached.get("sha256"), str):
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    result = digest.hexdigest()
    tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"files": stats, "sha256": result}))
        os.replace(tmp, sidecar)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only model directory: hash again next time
    return result
