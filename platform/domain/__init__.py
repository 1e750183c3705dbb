"""Domain types shared by every part of lorafleet: errors, lifecycles, ids, LoRA naming.

This package imports nothing else of the project and no heavy library.
"""

from lorafleet.platform.domain.enums import (
    FileKind,
    FileStatus,
    JobMethod,
    JobStatus,
    ReplicaRole,
    RolloutState,
    Scope,
)
from lorafleet.platform.domain.errors import (
    Conflict,
    ErrorCategory,
    Forbidden,
    IntegrityFailure,
    InvalidRequest,
    InvalidTransition,
    LorafleetError,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from lorafleet.platform.domain.ids import new_id, new_ulid

__all__ = [
    "Conflict",
    "ErrorCategory",
    "FileKind",
    "FileStatus",
    "Forbidden",
    "IntegrityFailure",
    "InvalidRequest",
    "InvalidTransition",
    "JobMethod",
    "JobStatus",
    "LorafleetError",
    "NotFound",
    "PayloadTooLarge",
    "QuotaExceeded",
    "ReplicaRole",
    "RolloutState",
    "Scope",
    "Unauthorized",
    "Unavailable",
    "new_id",
    "new_ulid",
]
