"""Checksum and length checks shared by the stores, so both report corruption the same way."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from lorafleet.platform.domain.errors import IntegrityFailure

CHUNK_BYTES = 1024 * 1024


def check(key: str, *, recorded_size: int | None, recorded_sha256: str | None,
          actual_size: int, actual_sha256: str | None) -> None:
    """Raise IntegrityFailure when the bytes read do not match what was recorded at write time.

    A short object is reported as ``truncated_object`` (a partial write or a cut transfer);
    every other mismatch as ``checksum_mismatch``. ``None`` means "not recorded / not computed".
    """
    if recorded_size is not None and actual_size < recorded_size:
        raise IntegrityFailure(
            f"object {key!r} is truncated: {actual_size} of {recorded_size} bytes",
            code="truncated_object", details={"key": key, "expected": recorded_size, "actual": actual_size},
        )
    if recorded_size is not None and actual_size != recorded_size:
        raise IntegrityFailure(
            f"object {key!r} has {actual_size} bytes, {recorded_size} were recorded",
            code="checksum_mismatch", details={"key": key, "expected": recorded_size, "actual": actual_size},
        )
    if recorded_sha256 is not None and actual_sha256 is not None and actual_sha256 != recorded_sha256:
        raise IntegrityFailure(
            f"object {key!r} does not match its recorded sha256",
            code="checksum_mismatch",
            details={"key": key, "expected": recorded_sha256, "actual": actual_sha256},
        )


def sha256_of_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a local file, read in chunks."""
    with path.open("rb") as fh:
        return sha256_of_stream(fh)


def sha256_of_stream(stream: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
