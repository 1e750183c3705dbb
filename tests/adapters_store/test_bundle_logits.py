"""A model with the adapter applied gives identical logits from either form (packed bundle or
PEFT layout), on lorafleet's own model; and PEFT applying lorafleet's export to a transformers
Qwen3 gives the logits lorafleet's model gives with the packed bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.adapters_store.bundle import export_peft, import_peft, load_tensors, peft_to_engine
from lorafleet.adapters_store.bundle.peft import PEFT_WEIGHTS_FILE
from lorafleet.adapters_store.bundle.verify import ExpectedBase
from tests.adapters_store._bundle_support import DENSE_HF, TINY_MOE_HF, make_bundle, meta

modeling = pytest.importorskip("lorafleet.platform.modeling", reason="platform/modeling is not there yet")


def _save_tiny_hf_model(hf: dict[str, Any], out: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim")  # fmt: skip
    common = {n: hf[n] for n in names} | {"max_position_embeddings": 64, "tie_word_embeddings": False}
    if hf["model_type"] == "qwen3_moe":
        moe = ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "mlp_only_layers")
        cfg = Qwen3MoeConfig(**common, **{n: hf[n] for n in moe}, decoder_sparse_step=1)
        model: Any = Qwen3MoeForCausalLM(cfg)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    with torch.no_grad():  # random experts/router weights at a scale where routing is decisive
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def _lorafleet_logits(
    model: Any, spec: Any, tensors: dict[str, torch.Tensor], scaling: float, ids: torch.Tensor
) -> torch.Tensor:
    bank = modeling.DeviceAdapterBank(spec, capacity=2, max_rank=8, dtype=torch.float32)
    bank.load(1, tensors, scaling=scaling)
    with torch.no_grad():
        return model(ids, lora=modeling.LoraBatch(bank.bank, [1] * ids.shape[0]))


@pytest.mark.parametrize("hf", [TINY_MOE_HF, DENSE_HF], ids=["moe", "dense"])
def test_packed_and_peft_forms_give_identical_logits(tmp_path: Path, hf: dict[str, Any]) -> None:
    base_dir = _save_tiny_hf_model(hf, tmp_path / "base")
    model, spec, _ = modeling.load_base_model(base_dir)
    fp = modeling.fingerprint(base_dir)
    base = ExpectedBase(spec=spec, fingerprint=fp, max_lora_rank=8)
    manifest, _ = make_bundle(tmp_path / "packed", hf, rank=4, dtype=torch.float32, base_fingerprint=fp)
    export_peft(tmp_path / "packed", tmp_path / "peft")
    reimported = import_peft(tmp_path / "peft", tmp_path / "again", base=base, meta=meta(base_fingerprint=fp))

    ids = torch.randint(0, hf["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids)
    packed = _lorafleet_logits(
        model, spec, load_tensors(tmp_path / "packed", manifest), manifest.scaling, ids
    )
    via_peft_dir = _lorafleet_logits(
        model, spec, peft_to_engine(load_file(tmp_path / "peft" / PEFT_WEIGHTS_FILE)), manifest.scaling, ids
    )
    via_reimport = _lorafleet_logits(
        model, spec, load_tensors(tmp_path / "again", reimported), reimported.scaling, ids
    )
    assert not torch.allclose(packed, plain, atol=1e-3)  # the adapter changes the output
    assert torch.equal(packed, via_peft_dir) and torch.equal(packed, via_reimport)


def test_peft_on_transformers_matches_lorafleet_with_the_packed_bundle(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import Qwen3ForCausalLM

    base_dir = _save_tiny_hf_model(DENSE_HF, tmp_path / "base")
    model, spec, _ = modeling.load_base_model(base_dir)
    fp = modeling.fingerprint(base_dir)
    manifest, _ = make_bundle(tmp_path / "packed", DENSE_HF, rank=4, dtype=torch.float32, base_fingerprint=fp)
    export_peft(tmp_path / "packed", tmp_path / "peft", base_model_name_or_path=str(base_dir))

    ids = torch.randint(0, DENSE_HF["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(4))
    ours = _lorafleet_logits(model, spec, load_tensors(tmp_path / "packed", manifest), manifest.scaling, ids)
    hf_model = Qwen3ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf_model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=2e-4)
