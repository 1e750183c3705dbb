"""The ObjectStore seam: a flat key space of immutable-once-written byte objects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None
    """Recorded at write time; None only for objects written by something other than lorafleet."""


@runtime_checkable
class ObjectStore(Protocol):
    """Writes are atomic for readers (temp name then rename, or completed multipart): a reader
    sees the whole object or nothing. Reads verify the recorded sha256 and length and raise
    ``IntegrityFailure`` on a mismatch."""

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        """Store ``data`` under ``key``. ``if_absent`` refuses (Conflict) an existing key."""
        ...

    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        """Store a local file (multipart for large files on S3)."""
        ...

    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo: ...

    def get_bytes(self, key: str, *, verify: bool = True) -> bytes: ...

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)``; no checksum (a range cannot be verified alone)."""
        ...

    def download(self, key: str, path: Path, *, verify: bool = True) -> ObjectInfo:
        """Write the object to ``path`` atomically (parallel ranged reads on S3)."""
        ...

    def head(self, key: str) -> ObjectInfo:
        """Raises NotFound for a missing key."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None:
        """Missing keys are not an error."""
        ...

    def ping(self) -> None:
        """Raise Unavailable when the store cannot be reached."""
        ...
