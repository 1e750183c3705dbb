"""Object key rules shared by every store, so a key valid on one backend is valid on all.

Keys are ``/``-separated paths of non-empty segments. The character set is deliberately
narrow: it maps one-to-one onto file names (the local store), never needs URL quoting
quirks (S3), and leaves ``~`` free for the local store's own file suffixes.
"""

from __future__ import annotations

import re

from lorafleet.platform.domain.errors import InvalidRequest

MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 200
"""File systems allow 255 bytes per name; the local store appends up to ~40 of its own."""

_SEGMENT = re.compile(r"[A-Za-z0-9._=+@,-]+")


def _refuse(key: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"invalid object key {key!r}: {why}", code="invalid_object_key", param="key")


def validate_key(key: str) -> str:
    """Return ``key`` unchanged when it is a valid object key, else raise InvalidRequest."""
    if not isinstance(key, str) or not key:
        raise _refuse(str(key), "empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise _refuse(key[:64] + "...", f"longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/"):
        raise _refuse(key, "absolute path")
    for segment in key.split("/"):
        if not segment:
            raise _refuse(key, "empty path segment")
        if segment in (".", ".."):
            raise _refuse(key, "relative path segment")
        if len(segment) > MAX_SEGMENT_BYTES:
            raise _refuse(key, f"a segment is longer than {MAX_SEGMENT_BYTES} bytes")
        if not _SEGMENT.fullmatch(segment):
            raise _refuse(key, "only letters, digits and . _ = + @ , - are allowed in a segment")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, a key, a key followed by ``/``, or a key's leading part."""
    if prefix == "":
        return prefix
    validate_key(prefix.removesuffix("/"))
    return prefix
