"""The packed bundle: written from engine-form tensors, read back bit-identical and zero-copy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafleet.adapters_store.bundle import (
    MANIFEST_FILE,
    TENSOR_FILE,
    BundleManifest,
    BundleRejected,
    load_tensors,
    random_adapter,
    read_manifest,
    verify_bundle,
    write_bundle,
)
from lorafleet.platform.domain.errors import Conflict
from lorafleet.platform.domain.lora import LoraConfig
from tests.adapters_store._bundle_support import DENSE_HF, TINY_MOE_HF, bits, make_bundle, meta, spec_of


@pytest.mark.parametrize("hf", [TINY_MOE_HF, DENSE_HF], ids=["moe", "dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_engine_form_round_trips_bit_identical(tmp_path: Path, hf: dict, dtype: torch.dtype) -> None:
    manifest, tensors = make_bundle(tmp_path / "b", hf, dtype=dtype, rank=3)
    loaded = load_tensors(tmp_path / "b", manifest)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and loaded[name].shape == t.shape
        assert bits(loaded[name]) == bits(t), name


def test_manifest_records_what_the_format_promises(tmp_path: Path) -> None:
    manifest, tensors = make_bundle(tmp_path / "b", rank=2, job_id="ftjob-1", step=40)
    raw = (tmp_path / "b" / MANIFEST_FILE).read_bytes()
    assert raw == manifest.to_json_bytes()  # canonical: the row's sha256 is reproducible
    doc = json.loads(raw)
    assert doc["format_version"] == 1 and doc["layout"] == "packed-moe-v1"
    assert (doc["rank"], doc["alpha"], doc["scaling"], doc["dtype"]) == (2, 16.0, 8.0, "bfloat16")
    assert doc["num_experts"] == 8 and doc["job_id"] == "ftjob-1" and doc["step"] == 40
    assert doc["created_at"].endswith("Z")
    data = (tmp_path / "b" / TENSOR_FILE).read_bytes()
    assert doc["files"] == {TENSOR_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    # Stacked experts: [E, r, in] and [E, out, r]; attention per module: [r, in], [out, r].
    assert doc["tensors"]["layers.1.mlp.experts.gate_proj.lora_A"]["shape"] == [8, 2, 64]
    assert doc["tensors"]["layers.1.mlp.experts.down_proj.lora_B"]["shape"] == [8, 64, 2]
    assert doc["tensors"]["layers.0.self_attn.q_proj.lora_B"]["shape"] == [64, 2]
    # Offsets are absolute in the file: a ranged read of [begin, end) is the tensor's bytes.
    begin, end = doc["tensors"]["layers.2.self_attn.o_proj.lora_A"]["data_offsets"]
    assert data[begin:end] == bits(tensors["layers.2.self_attn.o_proj.lora_A"])
    assert len(doc["tensors"]) == len(tensors)
    assert BundleManifest.from_json_bytes(raw) == manifest


def test_loaded_tensors_are_copy_on_write_views(tmp_path: Path) -> None:
    manifest, tensors = make_bundle(tmp_path / "b")
    before = (tmp_path / "b" / TENSOR_FILE).read_bytes()
    loaded = load_tensors(tmp_path / "b", manifest)
    name = "layers.1.mlp.experts.up_proj.lora_A"
    loaded[name].mul_(3)  # an engine scaling in place must never reach the cached file
    assert (tmp_path / "b" / TENSOR_FILE).read_bytes() == before
    verify_bundle(tmp_path / "b", base=None)
    again = load_tensors(tmp_path / "b", manifest)
    assert bits(again[name]) == bits(tensors[name])


def test_loaded_tensors_survive_the_file_being_deleted(tmp_path: Path) -> None:
    manifest, tensors = make_bundle(tmp_path / "b")
    loaded = load_tensors(tmp_path / "b", manifest)
    (tmp_path / "b" / TENSOR_FILE).unlink()  # what cache eviction does
    name = "layers.2.mlp.experts.down_proj.lora_B"
    assert bits(loaded[name]) == bits(tensors[name])


def test_write_refuses_an_existing_bundle_and_leaves_no_temp_files(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    with pytest.raises(Conflict):
        make_bundle(tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_write_refuses_mixed_dtypes_and_wrong_rank(tmp_path: Path) -> None:
    lora = LoraConfig(rank=2, alpha=16.0)
    tensors = random_adapter(spec_of(DENSE_HF), lora)
    mixed = dict(tensors, **{"layers.0.mlp.up_proj.lora_A": tensors["layers.0.mlp.up_proj.lora_A"].float()})
    with pytest.raises(BundleRejected) as caught:
        write_bundle(tmp_path / "x", mixed, meta=meta(), lora=lora)
    assert caught.value.code == "dtype_mismatch"
    with pytest.raises(BundleRejected) as caught:
        write_bundle(tmp_path / "y", tensors, meta=meta(), lora=LoraConfig(rank=4, alpha=16.0))
    assert caught.value.code == "rank_mismatch"
    assert not any(tmp_path.iterdir())


def test_read_manifest_refuses_unknown_fields(tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    raw = json.loads((tmp_path / "b" / MANIFEST_FILE).read_bytes())
    raw["tensors"]["layers.0.self_attn.q_proj.lora_A"]["note"] = "x"  # unknown nested field
    (tmp_path / "b" / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(BundleRejected) as caught:
        read_manifest(tmp_path / "b")
    assert caught.value.code == "manifest_invalid"
    assert any("note" in d["loc"] for d in caught.value.details)


def test_importing_the_store_does_not_import_torch() -> None:
    code = (
        "import sys, lorafleet.adapters_store, lorafleet.adapters_store.bundle;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
