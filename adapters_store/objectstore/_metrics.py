"""``lorafleet_object_store_errors_total{operation}``: one count per store operation that failed on
the store's side (unreachable, refused credentials, corrupted bytes, a full disk), after retries.

A missing key, an ``if_absent`` conflict or a bad range are answers, not failures: not counted.
A public method that calls another (``exists`` calls ``head``) counts once, as the outer one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar, cast

from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import ErrorCategory, LorafleetError

F = TypeVar("F", bound=Callable[..., Any])

_inside: ContextVar[bool] = ContextVar("lorafleet_object_store_operation", default=False)


def _is_failure(exc: BaseException) -> bool:
    if isinstance(exc, LorafleetError):
        return exc.category is ErrorCategory.SERVER
    return isinstance(exc, OSError)


def counts_failures(operation: str) -> Callable[[F], F]:
    """Count the decorated store method's failures under ``operation`` (generators included)."""

    def decorate(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
                outer = not _inside.get()
                try:
                    yield from fn(*args, **kwargs)
                except BaseException as exc:
                    if outer and _is_failure(exc):
                        metrics.OBJECT_STORE_ERRORS.labels(operation=operation).inc()
                    raise

            return cast(F, generator)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            outer = not _inside.get()
            token = _inside.set(True)
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                if outer and _is_failure(exc):
                    metrics.OBJECT_STORE_ERRORS.labels(operation=operation).inc()
                raise
            finally:
                _inside.reset(token)

        return cast(F, call)

    return decorate
