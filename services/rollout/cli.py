"""The calls behind ``lorafleet policies rollout|rollback|status`` (the typer commands live in the CLI).

Each takes any client with ``request(method, path, **httpx_kwargs) -> parsed JSON`` that raises
on an error status, such as the CLI's ``ApiClient``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from lorafleet.platform.domain.enums import RolloutState
from lorafleet.platform.domain.errors import InvalidRequest


class JsonClient(Protocol):
    def request(self, method: str, path: str, **kwargs: Any) -> Any: ...


def parse_replicas(text: str | None) -> Any:
    """``all`` (default), a number (``{"count": n}``), or comma-separated replica ids."""
    if text is None or text.strip() in ("", "all"):
        return "all"
    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise InvalidRequest("a replica count is at least 1", param="replicas")
        return {"count": int(text)}
    ids = [p.strip() for p in text.split(",") if p.strip()]
    if not ids:
        raise InvalidRequest(f"no replica ids in {text!r}", param="replicas")
    return ids


def start_rollout(
    client: JsonClient,
    *,
    policy: str,
    revision: str,
    replicas: str | None = None,
    smoke_prompt: str | None = None,
    expect: str | None = None,
    smoke_max_tokens: int = 16,
) -> Any:
    body: dict[str, Any] = {"revision": revision, "replicas": parse_replicas(replicas)}
    if smoke_prompt:
        body["smoke"] = {"prompt": smoke_prompt, "max_tokens": smoke_max_tokens}
        if expect:
            body["smoke"]["expect"] = expect
    elif expect:
        raise InvalidRequest("--expect needs --smoke-prompt", param="expect")
    return client.request("POST", f"/v1/policies/{policy}/rollouts", json=body)


def wait_rollout(
    client: JsonClient,
    *,
    policy: str,
    rollout_id: str,
    timeout: float = 600.0,
    poll: float = 1.0,
    on_update: Callable[[Any], None] | None = None,
) -> Any:
    """Poll until the rollout leaves the active states (or ``timeout``); returns its last view."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.request("GET", f"/v1/policies/{policy}/rollouts/{rollout_id}")
        if on_update is not None:
            on_update(view)
        if not RolloutState(view["state"]).active or time.monotonic() >= deadline:
            return view
        time.sleep(poll)


def rollback(client: JsonClient, *, policy: str, revision: str | None = None) -> Any:
    return client.request(
        "POST", f"/v1/policies/{policy}/rollback", json={"revision": revision} if revision else {}
    )


def cancel(client: JsonClient, *, policy: str, rollout_id: str) -> Any:
    return client.request("POST", f"/v1/policies/{policy}/rollouts/{rollout_id}/cancel")


def status(client: JsonClient, *, policy: str, limit: int = 5) -> dict[str, Any]:
    """The policy (serving and previous revision) and its latest rollouts."""
    return {
        "policy": client.request("GET", f"/v1/policies/{policy}"),
        "rollouts": client.request("GET", f"/v1/policies/{policy}/rollouts", params={"limit": limit})["data"],
    }
