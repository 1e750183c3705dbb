"""PEFT layout ⇄ packed bundle: lossless both ways, validated on import, loadable by PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters_store.bundle import (
    TENSOR_FILE,
    BundleRejected,
    export_peft,
    import_peft,
    load_tensors,
    verify_bundle,
)
from lorafleet.adapters_store.bundle.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import ATTENTION_TARGETS, MLP_TARGETS, LoraConfig
from tests.adapters_store._bundle_support import (
    DENSE_HF,
    FINGERPRINT,
    TINY_MOE_HF,
    base_of,
    bits,
    make_bundle,
    meta,
    spec_of,
    write_raw_safetensors,
)

P = "base_model.model.model.layers"


def peft_keys_and_shapes(spec: ArchitectureSpec, rank: int) -> dict[str, tuple[int, int]]:
    """The PEFT/vLLM per-module key set, spelled out independently of the code under test."""
    h, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    out: dict[str, tuple[int, int]] = {}
    for layer in range(spec.num_layers):
        modules = {f"self_attn.{t}": dims for t, dims in attn.items()}
        if layer in spec.moe_layers:
            ffn = spec.moe_intermediate_size
            for e in range(spec.num_experts):
                modules |= {
                    f"mlp.experts.{e}.{t}": ((ffn, h) if t == "down_proj" else (h, ffn)) for t in MLP_TARGETS
                }
        else:
            ffn = spec.intermediate_size
            modules |= {f"mlp.{t}": ((ffn, h) if t == "down_proj" else (h, ffn)) for t in MLP_TARGETS}
        for module, (fan_in, fan_out) in modules.items():
            out[f"{P}.{layer}.{module}.lora_A.weight"] = (rank, fan_in)
            out[f"{P}.{layer}.{module}.lora_B.weight"] = (fan_out, rank)
    return out


def write_peft_source(
    out: Path, hf: dict[str, Any], *, rank: int = 2, dtype: torch.dtype = torch.bfloat16, **config: Any
) -> dict[str, torch.Tensor]:
    """A PEFT adapter directory as PEFT writes it: its own adapter_config.json, per-module tensors."""
    from peft import LoraConfig as PeftLoraConfig

    gen = torch.Generator().manual_seed(7)
    shapes = peft_keys_and_shapes(spec_of(hf), rank)
    tensors = {k: torch.randn(s, generator=gen).mul_(0.05).to(dtype) for k, s in shapes.items()}
    out.mkdir(parents=True)
    targets = list(ATTENTION_TARGETS + MLP_TARGETS)
    fields: dict[str, Any] = {
        "r": rank,
        "lora_alpha": 16,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    fields.update(config)
    PeftLoraConfig(**fields).save_pretrained(str(out))
    save_file(tensors, out / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})  # what save_pretrained writes
    return tensors


@pytest.mark.parametrize("hf", [TINY_MOE_HF, DENSE_HF], ids=["moe", "dense"])
def test_peft_to_packed_to_peft_is_bit_identical(tmp_path: Path, hf: dict[str, Any]) -> None:
    source = write_peft_source(tmp_path / "src", hf, rank=2)
    base = base_of(hf)
    manifest = import_peft(tmp_path / "src", tmp_path / "bundle", base=base, meta=meta())
    assert verify_bundle(tmp_path / "bundle", base=base) == manifest
    if hf is TINY_MOE_HF:  # 2 MoE layers x 8 experts x 3 projections x 2 factors folded into stacks
        # layer 0 dense: 8 attention + 6 MLP tensors; layers 1-2: 8 attention + 8 experts x 6 each.
        assert len(source) == 14 + 2 * (8 + 48)
        assert manifest.num_experts == 8 and len(manifest.tensors) == 3 * 8 + 3 * 6
        stacked = load_tensors(tmp_path / "bundle", manifest)["layers.2.mlp.experts.up_proj.lora_A"]
        assert stacked.shape == (8, 2, 64)
        assert bits(stacked[5]) == bits(source[f"{P}.2.mlp.experts.5.up_proj.lora_A.weight"])
    export_peft(tmp_path / "bundle", tmp_path / "out", base_model_name_or_path="tiny")
    src_bytes = (tmp_path / "src" / PEFT_WEIGHTS_FILE).read_bytes()
    assert (tmp_path / "out" / PEFT_WEIGHTS_FILE).read_bytes() == src_bytes  # every byte, header included
    exported = load_file(tmp_path / "out" / PEFT_WEIGHTS_FILE)
    assert exported.keys() == source.keys()
    assert all(bits(exported[k]) == bits(source[k]) for k in source)

    from peft import LoraConfig as PeftLoraConfig

    a = PeftLoraConfig.from_pretrained(str(tmp_path / "src"))
    b = PeftLoraConfig.from_pretrained(str(tmp_path / "out"))
    assert (a.r, a.lora_alpha, set(a.target_modules), a.peft_type) == (
        b.r,
        b.lora_alpha,
        set(b.target_modules),
        b.peft_type,
    )


def test_packed_to_peft_to_packed_keeps_the_tensor_file(tmp_path: Path) -> None:
    manifest, _ = make_bundle(tmp_path / "b1")
    export_peft(tmp_path / "b1", tmp_path / "peft")
    again = import_peft(tmp_path / "peft", tmp_path / "b2", base=base_of(TINY_MOE_HF), meta=meta())
    assert (tmp_path / "b1" / TENSOR_FILE).read_bytes() == (tmp_path / "b2" / TENSOR_FILE).read_bytes()
    assert again.files == manifest.files and again.tensors == manifest.tensors


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"use_dora": True}, "peft_config_unsupported"),
        ({"rank_pattern": {"q_proj": 4}}, "peft_config_unsupported"),
        ({"modules_to_save": ["lm_head"]}, "peft_config_unsupported"),
        ({"target_modules": "all-linear"}, "peft_config_unsupported"),
        ({"bias": "all"}, "peft_config_unsupported"),
        ({"r": 16}, "rank_exceeds_base_limit"),
    ],
    ids=["dora", "rank_pattern", "modules_to_save", "all_linear", "bias", "rank_over_limit"],
)
def test_import_refuses_configs_it_cannot_hold(tmp_path: Path, config: dict[str, Any], code: str) -> None:
    write_peft_source(tmp_path / "src", DENSE_HF, **config)
    with pytest.raises(BundleRejected) as caught:
        import_peft(tmp_path / "src", tmp_path / "bundle", base=base_of(DENSE_HF, max_rank=8), meta=meta())
    assert caught.value.code == code
    assert not (tmp_path / "bundle").exists()


def _retensor(src: Path, change: Any) -> None:
    tensors = load_file(src / PEFT_WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, src / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})


def _put(key: str, *shape: int) -> Any:
    return lambda t: t.update({key: torch.zeros(*shape, dtype=torch.bfloat16)})


def _drop(key: str) -> Any:
    return lambda t: t.pop(key)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (_put(f"{P}.0.self_attn.q_proj.lora_A.weight", 2, 65), "shape_mismatch"),
        (_put(f"{P}.0.self_attn.q_proj.lora_A.weight", 3, 64), "rank_mismatch"),
        (_drop(f"{P}.1.mlp.experts.3.gate_proj.lora_B.weight"), "missing_tensor"),
        (_drop(f"{P}.1.mlp.experts.7.gate_proj.lora_B.weight"), "shape_mismatch"),  # stacks only 7 experts
        (_drop(f"{P}.0.mlp.down_proj.lora_A.weight"), "missing_tensor"),
        (_put("base_model.model.lm_head.lora_A.weight", 2, 64), "unexpected_tensor"),
        (_put(f"{P}.9.self_attn.q_proj.lora_A.weight", 2, 64), "unexpected_tensor"),
        (lambda t: t.update({k: v.float() for k, v in list(t.items())[:3]}), "dtype_mismatch"),
    ],
    ids=["wrong_shape", "wrong_rank", "missing_expert", "last_expert_missing", "missing_module", "lm_head",
         "no_such_layer", "mixed_dtypes"],
)  # fmt: skip
def test_import_validates_tensors_against_the_base(tmp_path: Path, change: Any, code: str) -> None:
    write_peft_source(tmp_path / "src", TINY_MOE_HF)
    _retensor(tmp_path / "src", change)
    with pytest.raises(BundleRejected) as caught:
        import_peft(tmp_path / "src", tmp_path / "bundle", base=base_of(TINY_MOE_HF), meta=meta())
    assert caught.value.code == code, caught.value.message
    assert not (tmp_path / "bundle").exists()


def test_import_refuses_duplicate_tensor_names(tmp_path: Path) -> None:
    write_peft_source(tmp_path / "src", DENSE_HF)
    name = f"{P}.0.self_attn.q_proj.lora_A.weight"
    data = bytes(2 * 2 * 64)
    entry = json.dumps({"dtype": "BF16", "shape": [2, 64], "data_offsets": [0, len(data)]})
    write_raw_safetensors(
        tmp_path / "src" / PEFT_WEIGHTS_FILE, f'{{"{name}": {entry}, "{name}": {entry}}}', data
    )
    with pytest.raises(BundleRejected) as caught:
        import_peft(tmp_path / "src", tmp_path / "bundle", base=base_of(DENSE_HF), meta=meta())
    assert caught.value.code == "duplicate_tensor"
    assert caught.value.details == {"names": [name]}


def test_import_refuses_a_truncated_weights_file(tmp_path: Path) -> None:
    write_peft_source(tmp_path / "src", DENSE_HF)
    path = tmp_path / "src" / PEFT_WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BundleRejected) as caught:
        import_peft(tmp_path / "src", tmp_path / "bundle", base=base_of(DENSE_HF), meta=meta())
    assert caught.value.code == "truncated_file"


def test_exported_config_is_peft_config(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b", DENSE_HF, rank=4)
    export_peft(tmp_path / "b", tmp_path / "peft", base_model_name_or_path="/models/x")
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG_FILE).read_text())
    from peft import LoraConfig as PeftLoraConfig

    loaded = PeftLoraConfig.from_pretrained(str(tmp_path / "peft"))
    assert loaded.r == 4 and loaded.lora_alpha == 16 and loaded.base_model_name_or_path == "/models/x"
    assert set(loaded.target_modules) == set(ATTENTION_TARGETS + MLP_TARGETS)
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["use_dora"] is False


# -- PEFT itself loads what lorafleet exports ------------------------------------------------


def _tiny_qwen3(tmp_path: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in DENSE_HF.items() if k != "model_type"}
    cfg = Qwen3Config(**fields, max_position_embeddings=64, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_peft_loads_the_exported_adapter_onto_transformers_qwen3(tmp_path: Path) -> None:
    """PeftModel.from_pretrained on an exported dense adapter gives the logits of W + (alpha/r) B A."""
    from peft import PeftModel
    from transformers import AutoConfig, Qwen3ForCausalLM

    base_dir = _tiny_qwen3(tmp_path)
    spec = ArchitectureSpec.from_hf_config(AutoConfig.from_pretrained(base_dir).to_dict())
    lora = LoraConfig(rank=4, alpha=16.0)
    assert spec.lora_shapes(lora) == spec_of(DENSE_HF).lora_shapes(lora)
    manifest, tensors = make_bundle(
        tmp_path / "b", DENSE_HF, rank=4, dtype=torch.float32, base_fingerprint=FINGERPRINT
    )
    export_peft(tmp_path / "b", tmp_path / "peft", base_model_name_or_path=str(base_dir))

    ids = torch.randint(0, DENSE_HF["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    base_model = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base_model(ids).logits
    peft_model = PeftModel.from_pretrained(base_model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits

    merged = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, a in tensors.items():
            if not name.endswith("lora_A"):
                continue
            module = merged.model.get_submodule(name.removesuffix(".lora_A"))
            b = tensors[name.removesuffix("lora_A") + "lora_B"]
            module.weight += manifest.scaling * (b @ a)  # [out, r] @ [r, in]
        merged_logits = merged(ids).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-3)  # the adapter is really applied
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)
