"""A small HTTP client for the CLI commands that talk to a running control plane."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import typer

DEFAULT_URL = "http://127.0.0.1:8000"


def resolve_key(explicit: str | None, data_dir: Path) -> str:
    key = explicit or os.environ.get("LORAFLEET_API_KEY")
    if not key and (data_dir / "admin.key").exists():
        key = (data_dir / "admin.key").read_text().strip()
    if not key:
        raise typer.BadParameter("no API key: pass --api-key, set LORAFLEET_API_KEY, or run `lorafleet up` first")
    return key


class ApiClient:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                message = f"{err['code']}: {err['message']}"
            except (ValueError, KeyError, TypeError):
                message = response.text
            typer.secho(f"error {response.status_code} {message}", fg="red", err=True)
            raise typer.Exit(1)
        return response.json()
