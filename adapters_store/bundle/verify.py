"""Verification of a packed bundle before anything uses it. No torch: bytes, JSON and shapes only.

Order of checks (the first failure is raised, with every problem of its kind in ``details``):
manifest checksum and schema → file lengths and sha256 → safetensors header (duplicates,
truncation) → header agrees with the manifest's tensor index → base fingerprint → rank limit →
tensor names and shapes against the base architecture → dtypes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters_store.bundle._header import SafetensorsHeader, read_header
from lorafleet.adapters_store.bundle.errors import RejectCode, reject
from lorafleet.adapters_store.bundle.manifest import (
    MANIFEST_FILE,
    SAFETENSORS_DTYPE,
    TENSOR_FILE,
    BundleManifest,
)
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import LoraConfig, parse_adapter_key


@dataclass(frozen=True)
class ExpectedBase:
    """The base model a bundle must fit: its shapes, its weights' fingerprint, its rank limit."""

    spec: ArchitectureSpec
    fingerprint: str
    max_lora_rank: int


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(bundle_dir: Path, *, manifest_sha256: str | None = None) -> BundleManifest:
    """Parse ``manifest.json``; with ``manifest_sha256`` (the revision row's) its bytes are checked first."""
    path = bundle_dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise reject(RejectCode.MANIFEST_INVALID, f"{bundle_dir} has no {MANIFEST_FILE}") from None
    if manifest_sha256 is not None and hashlib.sha256(data).hexdigest() != manifest_sha256:
        raise reject(RejectCode.CHECKSUM_MISMATCH, f"{MANIFEST_FILE} does not match the recorded sha256")
    return BundleManifest.from_json_bytes(data)


def verify_file(path: Path, *, sha256: str, size: int) -> None:
    """Length first (so a short file reads as truncated, not as a checksum failure), then sha256."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise reject(RejectCode.TRUNCATED_FILE, f"{path.name} is missing") from None
    if actual < size:
        raise reject(RejectCode.TRUNCATED_FILE, f"{path.name} has {actual} bytes, {size} recorded")
    if actual > size or sha256_file(path) != sha256:
        raise reject(RejectCode.CHECKSUM_MISMATCH, f"{path.name} does not match its recorded sha256")


def verify_bundle(
    bundle_dir: Path, *, base: ExpectedBase | None, manifest_sha256: str | None = None
) -> BundleManifest:
    """Every check of FORMAT.md; returns the manifest of a bundle that passed them all.

    ``base`` None checks integrity and self-consistency only (used on a bundle this process
    just wrote); anything about to be cached, installed or served passes its base.
    """
    manifest = read_manifest(bundle_dir, manifest_sha256=manifest_sha256)
    for name, entry in manifest.files.items():
        verify_file(bundle_dir / name, sha256=entry.sha256, size=entry.bytes)
    header = read_header(bundle_dir / TENSOR_FILE)
    check_header_matches_manifest(header, manifest)
    if base is not None:
        if manifest.base_fingerprint != base.fingerprint:
            raise reject(
                RejectCode.BASE_FINGERPRINT_MISMATCH,
                f"bundle was trained on base {manifest.base_model_id!r} with fingerprint "
                f"{manifest.base_fingerprint[:16]}..., not on this base ({base.fingerprint[:16]}...)",
            )
        check_tensors_against_base(
            {name: (e.dtype, e.shape) for name, e in manifest.tensors.items()},
            lora=manifest.lora,
            dtype=SAFETENSORS_DTYPE[manifest.dtype],
            base=base,
        )
        expected_experts = _expected_num_experts(base.spec, manifest.lora)
        if manifest.num_experts != expected_experts:
            raise reject(
                RejectCode.SHAPE_MISMATCH,
                f"manifest says {manifest.num_experts} experts; the base has {expected_experts}",
            )
    return manifest


def check_header_matches_manifest(header: SafetensorsHeader, manifest: BundleManifest) -> None:
    in_header, in_manifest = set(header.entries), set(manifest.tensors)
    if missing := sorted(in_manifest - in_header):
        raise reject(
            RejectCode.MISSING_TENSOR, f"{len(missing)} indexed tensors not in the file", details=missing
        )
    if extra := sorted(in_header - in_manifest):
        raise reject(RejectCode.UNEXPECTED_TENSOR, f"{len(extra)} tensors not in the index", details=extra)
    want_dtype = SAFETENSORS_DTYPE[manifest.dtype]
    for name, h in header.entries.items():
        m = manifest.tensors[name]
        if h.dtype != m.dtype or h.dtype != want_dtype:
            raise reject(
                RejectCode.DTYPE_MISMATCH,
                f"{name}: file has {h.dtype}, index has {m.dtype}, manifest dtype is {manifest.dtype}",
            )
        if h.shape != m.shape:
            raise reject(RejectCode.SHAPE_MISMATCH, f"{name}: file has shape {h.shape}, index has {m.shape}")
        if (h.begin, h.end) != m.data_offsets:
            raise reject(RejectCode.MANIFEST_INVALID, f"{name}: index offsets disagree with the file")


def _expected_num_experts(spec: ArchitectureSpec, lora: LoraConfig) -> int:
    has_expert_tensors = any(".mlp.experts." in k for k in spec.lora_shapes(lora))
    return spec.num_experts if has_expert_tensors else 0


def _rank_axis(name: str, ndim: int) -> int:
    # lora_A is [r, in] or [E, r, in]; lora_B is [out, r] or [E, out, r].
    return ndim - 2 if parse_adapter_key(name)[3] == "lora_A" else ndim - 1


def check_tensors_against_base(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    lora: LoraConfig,
    dtype: str,
    base: ExpectedBase,
) -> None:
    """``tensors``: engine-form name → (safetensors dtype code, shape). ``dtype``: the one they must share."""
    if lora.rank > base.max_lora_rank:
        raise reject(
            RejectCode.RANK_EXCEEDS_BASE_LIMIT,
            f"rank {lora.rank} exceeds this base model's limit of {base.max_lora_rank}",
        )
    expected = base.spec.lora_shapes(lora)
    if missing := sorted(set(expected) - set(tensors)):
        raise reject(
            RejectCode.MISSING_TENSOR, f"{len(missing)} tensors the base needs are missing", details=missing
        )
    if extra := sorted(set(tensors) - set(expected)):
        raise reject(
            RejectCode.UNEXPECTED_TENSOR, f"{len(extra)} tensors do not fit this base", details=extra
        )
    rank_off: list[str] = []
    shape_off: list[str] = []
    for name, want in expected.items():
        got = tensors[name][1]
        if got == want:
            continue
        axis = _rank_axis(name, len(want))
        same_but_rank = len(got) == len(want) and all(
            g == w for i, (g, w) in enumerate(zip(got, want, strict=True)) if i != axis
        )
        (rank_off if same_but_rank else shape_off).append(f"{name}: {tuple(got)} != {want}")
    if shape_off:
        raise reject(
            RejectCode.SHAPE_MISMATCH, f"{len(shape_off)} tensors have the wrong shape", details=shape_off
        )
    if rank_off:
        raise reject(
            RejectCode.RANK_MISMATCH,
            f"{len(rank_off)} tensors disagree with the declared rank {lora.rank}",
            details=rank_off,
        )
    if off := sorted(name for name, (got_dtype, _) in tensors.items() if got_dtype != dtype):
        raise reject(RejectCode.DTYPE_MISMATCH, f"{len(off)} tensors are not {dtype}", details=off)
