"""Shapes shared by the list endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    last_id: str | None = None


def unix(ts: datetime | None) -> int | None:
    return int(ts.timestamp()) if ts is not None else None
