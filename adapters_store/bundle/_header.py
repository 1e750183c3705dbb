"""Reading a safetensors header ourselves, strictly.

Most readers build a dict from the header JSON and silently keep the last of two entries
with the same name; a bundle with duplicate names must be refused instead, so the header is
parsed here with a duplicate-detecting JSON hook. Offsets are checked to tile the data
section exactly, which also tells a truncated file from a malformed one. No torch here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.adapters_store.bundle.errors import RejectCode, reject

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors reference implementation refuses larger headers too."""

DTYPE_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the tensor's first byte in the file."""
    end: int
    """Absolute byte offset one past the tensor's last byte."""


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, HeaderEntry]
    """In file order (ascending offsets)."""
    metadata: dict[str, str]
    data_start: int
    """8 + the header's length: where the first tensor's bytes begin."""
    file_size: int


class _DuplicateKeys(ValueError):
    def __init__(self, names: list[str], top_level: bool) -> None:
        super().__init__(", ".join(names))
        self.names = names
        self.top_level = top_level


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    dupes = []
    for key, _ in pairs:
        if key in seen:
            dupes.append(key)
        seen.add(key)
    if dupes:
        # Tensor entries are the only objects that hold "data_offsets"; anything else is a nested object.
        top = not any(k in ("dtype", "shape", "data_offsets") for k, _ in pairs)
        raise _DuplicateKeys(sorted(set(dupes)), top)
    return dict(pairs)


def parse_header(prefix: bytes, *, file_size: int) -> SafetensorsHeader:
    """Parse the header at the start of a safetensors file of ``file_size`` bytes.

    ``prefix`` must hold at least the first ``8 + header_length`` bytes of the file.
    """
    if file_size < 8 or len(prefix) < 8:
        raise reject(RejectCode.TRUNCATED_FILE, f"safetensors file of {file_size} bytes has no header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise reject(RejectCode.HEADER_INVALID, f"safetensors header of {length} bytes is too large")
    if 8 + length > file_size or len(prefix) < 8 + length:
        raise reject(RejectCode.TRUNCATED_FILE, "safetensors file ends inside its header")
    try:
        raw = json.loads(prefix[8 : 8 + length].decode("utf-8"), object_pairs_hook=_pairs_hook)
    except _DuplicateKeys as exc:
        if exc.top_level:
            raise reject(
                RejectCode.DUPLICATE_TENSOR,
                f"safetensors header names a tensor more than once: {', '.join(exc.names)}",
                details={"names": exc.names},
            ) from None
        raise reject(RejectCode.HEADER_INVALID, f"duplicate fields in a header entry: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise reject(RejectCode.HEADER_INVALID, f"safetensors header is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise reject(RejectCode.HEADER_INVALID, "safetensors header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise reject(RejectCode.HEADER_INVALID, "safetensors __metadata__ must map strings to strings")
    data_start = 8 + length
    entries = [(name, _entry(name, value, data_start)) for name, value in raw.items()]
    entries.sort(key=lambda item: (item[1].begin, item[1].end))
    cursor = data_start
    for name, entry in entries:
        if entry.begin != cursor:
            raise reject(RejectCode.HEADER_INVALID, f"tensor {name!r} does not start where the previous ends")
        cursor = entry.end
    if cursor > file_size:
        raise reject(
            RejectCode.TRUNCATED_FILE,
            f"safetensors data needs {cursor} bytes but the file has {file_size}",
        )
    if cursor < file_size:
        raise reject(RejectCode.HEADER_INVALID, f"{file_size - cursor} bytes after the last tensor")
    return SafetensorsHeader(
        entries=dict(entries), metadata=dict(metadata), data_start=data_start, file_size=file_size
    )


def _entry(name: str, value: Any, data_start: int) -> HeaderEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise reject(RejectCode.HEADER_INVALID, f"header entry {name!r} must hold dtype, shape, data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPE_ITEMSIZE:
        raise reject(RejectCode.HEADER_INVALID, f"tensor {name!r} has unknown dtype {dtype!r}")
    ints_ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    offsets_ok = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    )
    if not (ints_ok and offsets_ok):
        raise reject(RejectCode.HEADER_INVALID, f"tensor {name!r} has a malformed shape or data_offsets")
    if (offsets[1] - offsets[0]) != math.prod(shape) * DTYPE_ITEMSIZE[dtype]:
        raise reject(RejectCode.HEADER_INVALID, f"tensor {name!r}: byte length does not match its shape")
    return HeaderEntry(
        dtype=dtype, shape=tuple(shape), begin=data_start + offsets[0], end=data_start + offsets[1]
    )


def read_header(path: Path) -> SafetensorsHeader:
    """Read and parse the header of the safetensors file at ``path``."""
    with path.open("rb") as f:
        file_size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        if len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            head += f.read(min(length, MAX_HEADER_BYTES + 1))
    return parse_header(head, file_size=file_size)
