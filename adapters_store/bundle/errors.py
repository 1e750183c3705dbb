"""Why a bundle was refused: one exception family, one stable code per failed check.

Callers catch :class:`BundleRejected` to refuse any bad bundle; the code says which check
failed. Integrity failures (bytes that do not match their recorded checksum or length) are
server-category errors, because for a stored revision they mean the store or the network
damaged it; every other failure is a user-category error (the bundle itself is wrong).
"""

from __future__ import annotations

from enum import StrEnum

from lorafleet.platform.domain.errors import IntegrityFailure, InvalidRequest, LorafleetError


class RejectCode(StrEnum):
    MANIFEST_INVALID = "manifest_invalid"
    """manifest.json is not JSON, breaks the schema, or has unknown fields."""
    UNSUPPORTED_FORMAT_VERSION = "unsupported_format_version"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    """A file's sha256 (or its length, when longer) differs from the recorded one."""
    TRUNCATED_FILE = "truncated_file"
    """A file is shorter than recorded, or the safetensors data ends before its header says."""
    HEADER_INVALID = "safetensors_header_invalid"
    """The safetensors header is not the JSON object the format requires, or its offsets overlap."""
    DUPLICATE_TENSOR = "duplicate_tensor"
    MISSING_TENSOR = "missing_tensor"
    UNEXPECTED_TENSOR = "unexpected_tensor"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    RANK_MISMATCH = "rank_mismatch"
    """Tensor shapes disagree with the declared rank (and only in the rank dimension)."""
    RANK_EXCEEDS_BASE_LIMIT = "rank_exceeds_base_limit"
    BASE_FINGERPRINT_MISMATCH = "base_fingerprint_mismatch"
    PEFT_CONFIG_UNSUPPORTED = "peft_config_unsupported"
    """An adapter_config.json asks for something the packed format cannot hold losslessly."""


_INTEGRITY_CODES = frozenset({RejectCode.CHECKSUM_MISMATCH, RejectCode.TRUNCATED_FILE})


class BundleRejected(LorafleetError):
    """A bundle failed a check; it is never installed, served or cached."""

    code = "bundle_rejected"


class BundleInvalid(BundleRejected, InvalidRequest):
    """The bundle's content is wrong for lorafleet or for the base model."""

    code = "bundle_invalid"


class BundleCorrupt(BundleRejected, IntegrityFailure):
    """The bundle's bytes do not match what was recorded when it was written."""

    code = "bundle_corrupt"


def reject(code: RejectCode, message: str, *, details: object = None) -> BundleRejected:
    """The exception for ``code``; the caller raises it (``raise reject(...)``) so tracebacks stay short."""
    cls = BundleCorrupt if code in _INTEGRITY_CODES else BundleInvalid
    return cls(message, code=code.value, details=details)
