"""The one error hierarchy. Each error carries a category and a stable code.

Only the HTTP edge maps these to status codes; everything else raises and catches them
by class. A code, once published, never changes meaning.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class ErrorCategory(StrEnum):
    USER = "user"
    """The caller sent something wrong; retrying the same request fails the same way."""
    SERVER = "server"
    """lorafleet or a part it depends on failed; the request may succeed later."""


class LorafleetError(Exception):
    """Base of every error lorafleet raises on purpose."""

    code: ClassVar[str] = "internal_error"
    category: ClassVar[ErrorCategory] = ErrorCategory.SERVER

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # a subclass may refine its code per instance
        self.param = param
        self.details = details

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "param": self.param}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class InvalidRequest(LorafleetError):
    code = "invalid_request"
    category = ErrorCategory.USER


class Unauthorized(LorafleetError):
    code = "unauthorized"
    category = ErrorCategory.USER


class Forbidden(LorafleetError):
    code = "forbidden"
    category = ErrorCategory.USER


class NotFound(LorafleetError):
    code = "not_found"
    category = ErrorCategory.USER


class Conflict(LorafleetError):
    code = "conflict"
    category = ErrorCategory.USER


class InvalidTransition(Conflict):
    code = "invalid_transition"


class PayloadTooLarge(LorafleetError):
    code = "payload_too_large"
    category = ErrorCategory.USER


class QuotaExceeded(LorafleetError):
    code = "quota_exceeded"
    category = ErrorCategory.USER


class IntegrityFailure(LorafleetError):
    """Stored bytes do not match their recorded checksum or length."""

    code = "integrity_failure"
    category = ErrorCategory.SERVER


class Unavailable(LorafleetError):
    """A bounded resource is full or a dependency is down; retry after ``retry_after`` seconds."""

    code = "unavailable"
    category = ErrorCategory.SERVER

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
