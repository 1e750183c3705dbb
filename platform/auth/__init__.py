"""API keys: random secrets shown once, stored as sha256, carrying scopes."""

from lorafleet.platform.auth.keys import (
    Principal,
    authenticate,
    create_api_key,
    create_tenant,
    ensure_default_tenant,
    hash_key,
    parse_scopes,
)

__all__ = [
    "Principal",
    "authenticate",
    "create_api_key",
    "create_tenant",
    "ensure_default_tenant",
    "hash_key",
    "parse_scopes",
]
