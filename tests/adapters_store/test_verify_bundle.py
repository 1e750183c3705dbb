"""Every verification failure is refused with its own stable code, and a good bundle passes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.adapters_store.bundle import (
    MANIFEST_FILE,
    TENSOR_FILE,
    BundleCorrupt,
    BundleInvalid,
    BundleRejected,
    random_adapter,
    verify_bundle,
)
from lorafleet.adapters_store.bundle._header import read_header
from lorafleet.platform.domain.errors import ErrorCategory
from lorafleet.platform.domain.lora import LoraConfig
from tests.adapters_store._bundle_support import (
    OTHER_FINGERPRINT,
    TINY_MOE_HF,
    base_of,
    make_bundle,
    spec_of,
    write_raw_safetensors,
)

BASE = base_of(TINY_MOE_HF, max_rank=8)


def _edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((bundle / MANIFEST_FILE).read_bytes())
    change(raw)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw))


def _refresh_file_entry(bundle: Path) -> None:
    """Re-record the tensor file's sha256 and length, so only the intended defect remains."""
    data = (bundle / TENSOR_FILE).read_bytes()

    def change(raw: dict[str, Any]) -> None:
        raw["files"][TENSOR_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    _edit_manifest(bundle, change)


def _flip_byte(bundle: Path) -> None:
    path = bundle / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))


def _truncate(bundle: Path) -> None:
    path = bundle / TENSOR_FILE
    path.write_bytes(path.read_bytes()[:-10])


def _truncate_and_rerecord(bundle: Path) -> None:
    _truncate(bundle)  # the manifest agrees with the short file: the safetensors header does not
    _refresh_file_entry(bundle)


def _unknown_field(bundle: Path) -> None:
    _edit_manifest(bundle, lambda raw: raw.update(shiny_new_field=1))


def _not_json(bundle: Path) -> None:
    (bundle / MANIFEST_FILE).write_text("{not json")


def _future_version(bundle: Path) -> None:
    _edit_manifest(bundle, lambda raw: raw.update(format_version=2))


def _manifest_says_float16(bundle: Path) -> None:
    _edit_manifest(bundle, lambda raw: raw.update(dtype="float16"))


def _manifest_says_rank_4(bundle: Path) -> None:
    _edit_manifest(bundle, lambda raw: raw.update(rank=4, scaling=raw["alpha"] / 4))


def _duplicate_name(bundle: Path) -> None:
    """Name one tensor twice in the header; a dict-building JSON reader would keep just one."""
    path = bundle / TENSOR_FILE
    header = read_header(path)
    data = path.read_bytes()[header.data_start :]
    rows = [(n, e.dtype, list(e.shape), e.begin - header.data_start, e.end - header.data_start)
            for n, e in header.entries.items()]  # fmt: skip
    name, dtype, shape, begin, end = rows[0]
    rows.append((name, dtype, shape, len(data), len(data) + end - begin))  # over a copy of its bytes
    data += data[begin:end]
    body = ", ".join(
        f"{json.dumps(n)}: {json.dumps({'dtype': d, 'shape': s, 'data_offsets': [b, e]})}"
        for n, d, s, b, e in rows
    )
    write_raw_safetensors(path, '{"__metadata__": {"format": "pt"}, ' + body + "}", data)
    _refresh_file_entry(bundle)


def _garbage_header(bundle: Path) -> None:
    write_raw_safetensors(bundle / TENSOR_FILE, json.dumps({"x": "not an entry"}), b"")
    _refresh_file_entry(bundle)


# (defect, expected code, expected category)
CASES: list[tuple[Callable[[Path], None], str, ErrorCategory]] = [
    (_unknown_field, "manifest_invalid", ErrorCategory.USER),
    (_not_json, "manifest_invalid", ErrorCategory.USER),
    (_future_version, "unsupported_format_version", ErrorCategory.USER),
    (_flip_byte, "checksum_mismatch", ErrorCategory.SERVER),
    (_truncate, "truncated_file", ErrorCategory.SERVER),
    (_truncate_and_rerecord, "truncated_file", ErrorCategory.SERVER),
    (_manifest_says_float16, "dtype_mismatch", ErrorCategory.USER),
    (_manifest_says_rank_4, "rank_mismatch", ErrorCategory.USER),
    (_duplicate_name, "duplicate_tensor", ErrorCategory.USER),
    (_garbage_header, "safetensors_header_invalid", ErrorCategory.USER),
]


@pytest.fixture
def good(tmp_path: Path) -> Path:
    make_bundle(tmp_path / "b", rank=2)
    return tmp_path / "b"


def test_good_bundle_passes_every_check(good: Path) -> None:
    sha = hashlib.sha256((good / MANIFEST_FILE).read_bytes()).hexdigest()
    manifest = verify_bundle(good, base=BASE, manifest_sha256=sha)
    assert manifest.rank == 2 and manifest.num_experts == 8 and manifest.layout == "packed-moe-v1"
    assert set(manifest.tensors) == set(spec_of(TINY_MOE_HF).lora_shapes(manifest.lora))


@pytest.mark.parametrize(("defect", "code", "category"), CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_defect_is_refused_with_its_code(
    good: Path, defect: Callable[[Path], None], code: str, category: ErrorCategory
) -> None:
    defect(good)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=BASE)
    assert caught.value.code == code, caught.value.message
    assert caught.value.category == category
    assert isinstance(caught.value, BundleCorrupt if category == ErrorCategory.SERVER else BundleInvalid)


def test_manifest_not_matching_the_revision_row_is_refused(good: Path) -> None:
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=BASE, manifest_sha256="0" * 64)
    assert caught.value.code == "checksum_mismatch"


def test_wrong_base_fingerprint_is_refused(good: Path) -> None:
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=base_of(TINY_MOE_HF, fingerprint=OTHER_FINGERPRINT))
    assert caught.value.code == "base_fingerprint_mismatch"


def test_rank_above_the_base_limit_is_refused(good: Path) -> None:
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=base_of(TINY_MOE_HF, max_rank=1))
    assert caught.value.code == "rank_exceeds_base_limit"


def _tensors(rank: int = 2) -> dict[str, torch.Tensor]:
    return random_adapter(spec_of(TINY_MOE_HF), LoraConfig(rank=rank, alpha=16.0))


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    tensors["layers.1.mlp.experts.down_proj.lora_A"] = torch.zeros(8, 2, 33, dtype=torch.bfloat16)  # in is 32
    make_bundle(tmp_path / "b", tensors=tensors)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(tmp_path / "b", base=BASE)
    assert caught.value.code == "shape_mismatch"
    assert any("down_proj.lora_A" in d for d in caught.value.details)


def test_wrong_expert_count_is_a_shape_mismatch(tmp_path: Path) -> None:
    hf = dict(TINY_MOE_HF, num_experts=6)
    make_bundle(tmp_path / "b", hf)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(tmp_path / "b", base=BASE)
    assert caught.value.code == "shape_mismatch"


def test_missing_tensor_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    del tensors["layers.2.self_attn.v_proj.lora_B"]
    make_bundle(tmp_path / "b", tensors=tensors)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(tmp_path / "b", base=BASE)
    assert caught.value.code == "missing_tensor"
    assert caught.value.details == ["layers.2.self_attn.v_proj.lora_B"]


def test_unexpected_tensor_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    tensors["layers.7.self_attn.q_proj.lora_A"] = torch.zeros(2, 64, dtype=torch.bfloat16)  # no layer 7
    make_bundle(tmp_path / "b", tensors=tensors)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(tmp_path / "b", base=BASE)
    assert caught.value.code == "unexpected_tensor"


def test_index_naming_a_tensor_the_file_lacks_is_missing_tensor(good: Path) -> None:
    def change(raw: dict[str, Any]) -> None:
        raw["tensors"]["layers.0.self_attn.q_proj.lora_C"] = raw["tensors"][
            "layers.0.self_attn.q_proj.lora_A"
        ]

    _edit_manifest(good, change)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=BASE)
    # lora_C is outside the naming contract: the schema refuses it before any file is read.
    assert caught.value.code == "manifest_invalid"

    def drop(raw: dict[str, Any]) -> None:
        del raw["tensors"]["layers.0.self_attn.q_proj.lora_C"]
        del raw["tensors"]["layers.0.self_attn.q_proj.lora_A"]

    _edit_manifest(good, drop)
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=BASE)
    assert caught.value.code == "unexpected_tensor"  # in the file, not in the index


def test_missing_manifest_is_invalid(good: Path) -> None:
    (good / MANIFEST_FILE).unlink()
    with pytest.raises(BundleRejected) as caught:
        verify_bundle(good, base=BASE)
    assert caught.value.code == "manifest_invalid"
