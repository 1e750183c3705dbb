"""Object ids: a type prefix and a ULID, so ids sort by creation time and say what they name."""

from ulid import ULID

PREFIXES = {
    "tenant": "ten",
    "api_key": "key",
    "file": "file",
    "job": "ftjob",
    "checkpoint": "ftckpt",
    "event": "ftevent",
    "policy": "pol",
    "rollout": "ro",
    "replica": "rep",
    "audit": "aud",
}


def new_ulid() -> str:
    """A bare ULID (26 characters, Crockford base32, lower case). Adapter revisions use these."""
    return str(ULID()).lower()


def new_id(kind: str) -> str:
    return f"{PREFIXES[kind]}-{new_ulid()}"
