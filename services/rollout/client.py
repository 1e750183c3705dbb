"""HTTP client of a serving replica, as the rollout controller drives it.

Agent endpoints (``services/serving/agent/routes.py``), with the platform admin key:

- ``POST /internal/adapters/warm {revision_id, tier, pin}`` → the load report;
- ``POST /internal/adapters/unpin {revision_id}``, ``POST /internal/adapters/evict {revision_id}``;
- ``GET /internal/adapters`` → what is resident, per tier, with pins.

The smoke generation is an ordinary ``POST /v1/chat/completions`` naming ``policy@revision``
with a key of the policy's tenant (``infer``), so it takes the path user requests take.

Every error becomes a :class:`ReplicaError` that says whether retrying can help: a 503 (the
replica's admission control refused a load, with ``Retry-After``), a 502/504 or a transport
failure is retryable; anything else (a bundle that fails verification, an unknown revision,
a base mismatch, bad credentials) is not. :meth:`ReplicaClient.retrying` retries the first kind
with exponential backoff and jitter, never sooner than the replica's ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from lorafleet.platform.domain.errors import ErrorCategory, LorafleetError

T = TypeVar("T")

_RETRYABLE_STATUS = frozenset({502, 503, 504})
REVISION_HEADER = "X-Lorafleet-Revision"


class ReplicaError(LorafleetError):
    """A serving replica refused, failed, or could not be reached."""

    code = "replica_error"
    category = ErrorCategory.SERVER

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int | None,
        retryable: bool,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "status": self.status}


class WarmReport(BaseModel):
    # The replica's answer: read tolerantly (a newer replica may add fields).
    model_config = ConfigDict(extra="ignore")

    revision_id: str
    tier: str
    pinned: bool = False
    already_resident: bool = False
    seconds: dict[str, float] = {}
    incarnation: str | None = None
    """The replica process that loaded it (None from replicas that do not say)."""


class ResidentInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    revision_id: str
    tier: str
    pinned: bool = False
    in_flight: int = 0


class SmokeAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str
    revision_id: str | None
    """The revision the replica says answered (``X-Lorafleet-Revision``)."""


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:  # an HTTP date: not sent by lorafleet replicas; fall back to our backoff
        return None


def error_of(response: httpx.Response, what: str) -> ReplicaError:
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:500]
    return ReplicaError(
        f"{what}: {message}",
        code=code,
        status=response.status_code,
        retryable=response.status_code in _RETRYABLE_STATUS,
        retry_after=_retry_after(response),
    )


class ReplicaClient:
    def __init__(
        self,
        *,
        admin_key: str,
        timeout: float = 120.0,
        connect_timeout: float = 3.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._admin = {"Authorization": f"Bearer {admin_key}"}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout), transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ReplicaError(
                f"{what}: {type(exc).__name__}: {exc}",
                code="replica_unreachable",
                status=None,
                retryable=True,
            ) from exc
        if response.status_code >= 400:
            raise error_of(response, what)
        return response

    async def warm(
        self, address: str, revision_id: str, *, tier: str = "device", pin: bool = True
    ) -> WarmReport:
        r = await self._call(
            "POST",
            f"{address.rstrip('/')}/internal/adapters/warm",
            f"warm {revision_id}",
            json={"revision_id": revision_id, "tier": tier, "pin": pin},
            headers=self._admin,
        )
        return WarmReport.model_validate(r.json())

    async def unpin(self, address: str, revision_id: str) -> None:
        await self._call(
            "POST",
            f"{address.rstrip('/')}/internal/adapters/unpin",
            f"unpin {revision_id}",
            json={"revision_id": revision_id},
            headers=self._admin,
        )

    async def evict(self, address: str, revision_id: str) -> None:
        await self._call(
            "POST",
            f"{address.rstrip('/')}/internal/adapters/evict",
            f"evict {revision_id}",
            json={"revision_id": revision_id},
            headers=self._admin,
        )

    async def resident(self, address: str) -> list[ResidentInfo]:
        r = await self._call(
            "GET", f"{address.rstrip('/')}/internal/adapters", "list adapters", headers=self._admin
        )
        return [ResidentInfo.model_validate(item) for item in r.json().get("data", [])]

    async def smoke(
        self, address: str, *, api_key: str, model: str, prompt: str, max_tokens: int
    ) -> SmokeAnswer:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        r = await self._call(
            "POST",
            f"{address.rstrip('/')}/v1/chat/completions",
            f"smoke {model}",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
        )
        try:
            text = str(r.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ReplicaError(
                f"smoke {model}: unreadable answer {r.text[:200]!r}",
                code="smoke_bad_response",
                status=r.status_code,
                retryable=False,
            ) from exc
        return SmokeAnswer(text=text, revision_id=r.headers.get(REVISION_HEADER))

    @staticmethod
    async def retrying(
        call: Callable[[], Awaitable[T]],
        *,
        within_seconds: float,
        on_attempt: Callable[[], None] | None = None,
        max_backoff: float = 5.0,
    ) -> T:
        """Run ``call``; retry a retryable :class:`ReplicaError` until ``within_seconds`` have passed
        (then the last error is raised)."""

        def wait(state: RetryCallState) -> float:
            backoff = wait_exponential_jitter(multiplier=0.1, max=max_backoff, jitter=0.1)(state)
            exc = state.outcome.exception() if state.outcome else None
            hinted = exc.retry_after if isinstance(exc, ReplicaError) and exc.retry_after else 0.0
            return max(backoff, min(hinted, 30.0))

        async def attempt() -> T:
            if on_attempt is not None:
                on_attempt()
            return await call()

        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, ReplicaError) and e.retryable),
            stop=stop_after_delay(max(0.0, within_seconds)),
            wait=wait,
            reraise=True,
        )
        return await retrying(attempt)
