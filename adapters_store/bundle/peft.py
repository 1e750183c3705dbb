"""Lossless conversion between the packed bundle and the PEFT layout.

PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with one tensor per
module, ``base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight`` [r, in] /
``...lora_B.weight`` [out, r]; routed experts spelled per expert as vLLM and PEFT expect,
``base_model.model.model.layers.{l}.mlp.experts.{e}.gate_proj.lora_A.weight`` [r, in].
Packing stacks those per-expert tensors into the engine's [E, r, in] / [E, out, r]; exporting
slices them again. Neither direction changes a bit of any tensor.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from lorafleet.adapters_store.bundle._header import read_header
from lorafleet.adapters_store.bundle.errors import RejectCode, reject
from lorafleet.adapters_store.bundle.manifest import BundleManifest
from lorafleet.adapters_store.bundle.pack import BundleMeta, dtype_code, load_tensors, write_bundle
from lorafleet.adapters_store.bundle.verify import ExpectedBase, check_tensors_against_base, verify_bundle
from lorafleet.platform.domain.errors import Conflict
from lorafleet.platform.domain.lora import ALL_TARGETS, LoraConfig, adapter_key, parse_adapter_key

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.model."

_PEFT_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\."
    r"(?:(?P<attn>self_attn)|mlp\.experts\.(?P<expert>\d+)|(?P<shared>mlp\.shared_expert)|(?P<mlp>mlp))\."
    r"(?P<target>[a-z_]+)\.(?P<factor>lora_A|lora_B)\.weight$"
)


def engine_to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Engine form → PEFT keys; stacked experts become per-expert views (no copies)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        layer, site, target, factor = parse_adapter_key(name)
        if site == "experts":
            for e in range(t.shape[0]):  # t: [E, r, in] or [E, out, r]
                out[f"{_PREFIX}layers.{layer}.mlp.experts.{e}.{target}.{factor}.weight"] = t[e]
        else:
            out[f"{_PREFIX}{name}.weight"] = t
    return out


def peft_to_engine(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys → engine form, stacking each layer's per-expert factors into [E, r, in] / [E, out, r]."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        m = _PEFT_KEY_RE.match(key)
        if m is None or m["target"] not in ALL_TARGETS:
            raise reject(RejectCode.UNEXPECTED_TENSOR, f"{key!r} is not a LoRA tensor lorafleet can hold")
        layer, target, factor = int(m["layer"]), m["target"], m["factor"]
        if m["expert"] is not None:
            groups[adapter_key(layer, "experts", target, factor)][int(m["expert"])] = t  # type: ignore[arg-type]
        else:
            site = "attn" if m["attn"] else "shared_expert" if m["shared"] else "mlp"
            out[adapter_key(layer, site, target, factor)] = t  # type: ignore[arg-type]
    for name, per_expert in groups.items():
        count = max(per_expert) + 1
        if len(per_expert) != count:
            gaps = sorted(set(range(count)) - set(per_expert))
            raise reject(RejectCode.MISSING_TENSOR, f"{name}: experts {gaps[:8]} missing", details=gaps)
        shapes = {tuple(t.shape) for t in per_expert.values()}
        if len(shapes) != 1:
            raise reject(RejectCode.SHAPE_MISMATCH, f"{name}: experts disagree on shape: {sorted(shapes)}")
        out[name] = torch.stack([per_expert[e] for e in range(count)])
    return out


def peft_config(lora: LoraConfig, *, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for a plain LoRA over ``lora.targets`` (PEFT's field names)."""
    alpha: float | int = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": alpha,
        "target_modules": sorted(lora.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


# Fields whose non-default values change what the tensors mean; anything else in a PEFT
# config (versions, bookkeeping fields newer PEFT releases add) is ignored.
_MUST_BE_EMPTY = (
    "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "target_parameters",
    "exclude_modules", "layer_replication", "trainable_token_indices",
)  # fmt: skip
_MUST_BE_FALSE = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "use_qalora", "use_bdlora")


def lora_from_peft_config(cfg: Mapping[str, Any]) -> LoraConfig:
    """The LoraConfig an adapter_config.json describes; refuses features the packed format cannot hold."""

    def unsupported(why: str) -> BaseException:
        return reject(RejectCode.PEFT_CONFIG_UNSUPPORTED, f"adapter_config.json: {why}")

    if cfg.get("peft_type") != "LORA":
        raise unsupported(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    for field in _MUST_BE_EMPTY:
        if cfg.get(field):
            raise unsupported(f"{field} is not supported")
    for field in _MUST_BE_FALSE:
        if cfg.get(field):
            raise unsupported(f"{field} is not supported")
    if cfg.get("bias", "none") != "none":
        raise unsupported("LoRA bias terms are not supported")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise unsupported("target_modules must be a list of module names (regex and all-linear are not)")
    if unknown := sorted(set(targets) - set(ALL_TARGETS)):
        raise unsupported(f"target modules {unknown} are not LoRA targets lorafleet serves")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(rank) is not int or rank < 1 or not isinstance(alpha, int | float) or alpha <= 0:
        raise unsupported("r must be a positive integer and lora_alpha a positive number")
    try:
        return LoraConfig(
            rank=rank, alpha=float(alpha), targets=tuple(t for t in ALL_TARGETS if t in targets)
        )
    except ValidationError as exc:
        raise unsupported(str(exc)) from None


def import_peft(peft_dir: Path, out_dir: Path, *, base: ExpectedBase, meta: BundleMeta) -> BundleManifest:
    """Validate a PEFT adapter against ``base`` and write it as a packed bundle at ``out_dir``."""
    try:
        cfg = json.loads((peft_dir / PEFT_CONFIG_FILE).read_bytes())
    except FileNotFoundError:
        raise reject(RejectCode.PEFT_CONFIG_UNSUPPORTED, f"{peft_dir} has no {PEFT_CONFIG_FILE}") from None
    except json.JSONDecodeError as exc:
        raise reject(RejectCode.PEFT_CONFIG_UNSUPPORTED, f"{PEFT_CONFIG_FILE} is not JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise reject(RejectCode.PEFT_CONFIG_UNSUPPORTED, f"{PEFT_CONFIG_FILE} is not a JSON object")
    rank = cfg.get("r")
    if (
        type(rank) is int and rank > base.max_lora_rank
    ):  # before reading tensors: refuse a large upload cheaply
        raise reject(
            RejectCode.RANK_EXCEEDS_BASE_LIMIT,
            f"rank {rank} exceeds this base model's limit of {base.max_lora_rank}",
        )
    lora = lora_from_peft_config(cfg)
    weights = peft_dir / PEFT_WEIGHTS_FILE
    if not weights.exists():
        raise reject(RejectCode.MISSING_TENSOR, f"{peft_dir} has no {PEFT_WEIGHTS_FILE}")
    read_header(weights)  # duplicate names, truncation: refused before safetensors' lenient reader sees it
    engine = peft_to_engine(load_file(weights))
    dtypes = {t.dtype for t in engine.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.bfloat16, torch.float16, torch.float32):
        raise reject(
            RejectCode.DTYPE_MISMATCH, f"tensors must share bf16, f16 or f32; got {sorted(map(str, dtypes))}"
        )
    check_tensors_against_base(
        {name: (dtype_code(t.dtype), tuple(t.shape)) for name, t in engine.items()},
        lora=lora,
        dtype=dtype_code(next(iter(dtypes))),
        base=base,
    )
    return write_bundle(out_dir, engine, meta=meta, lora=lora, base=base)


def export_peft(bundle_dir: Path, out_dir: Path, *, base_model_name_or_path: str | None = None) -> None:
    """Write the bundle at ``bundle_dir`` in the PEFT layout at ``out_dir`` (which must not exist)."""
    manifest = verify_bundle(bundle_dir, base=None)
    tensors = load_tensors(bundle_dir, manifest)
    if out_dir.exists():
        raise Conflict(f"{out_dir} already exists", code="export_exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        # metadata {"format": "pt"} is what PEFT's save_pretrained writes: same tensors, same bytes.
        save_file(engine_to_peft(tensors), tmp / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        config = peft_config(manifest.lora, base_model_name_or_path=base_model_name_or_path)
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
