"""Reward graders for reinforcement jobs. None runs user-supplied code in the trainer process:
``http`` calls a team-owned service instead.

A grader returns a reward in [0, 1] per sample, or raises :class:`GraderFailure`; a failed
sample is left out of the loss and counted, never scored as zero.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, Protocol

import httpx
import jsonschema
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from lorafleet.platform.domain.datasets import RLRow
from lorafleet.platform.domain.errors import LorafleetError
from lorafleet.platform.domain.jobs import HttpGrader, JsonSchemaGrader, NumericGrader, StringCheckGrader

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class GraderFailure(LorafleetError):
    code = "grader_error"


class Grader(Protocol):
    def grade(self, row: RLRow, completion: str) -> float: ...


def _reference(row: RLRow, field: str) -> Any:
    value = row.field(field)
    if value is None:
        raise GraderFailure(f"row has no {field!r} field to grade against", code="grader_missing_reference")
    return value


class StringCheck:
    def __init__(self, spec: StringCheckGrader) -> None:
        self.spec = spec

    def grade(self, row: RLRow, completion: str) -> float:
        ref = str(_reference(row, self.spec.reference_field))
        text = completion.strip()
        flags = 0 if self.spec.case_sensitive else re.IGNORECASE
        if self.spec.operation == "regex":
            return 1.0 if re.search(ref, text, flags) else 0.0
        if not self.spec.case_sensitive:
            ref, text = ref.lower(), text.lower()
        if self.spec.operation == "eq":
            return 1.0 if text == ref.strip() else 0.0
        return 1.0 if ref in text else 0.0


class JsonSchemaCheck:
    def __init__(self, spec: JsonSchemaGrader) -> None:
        jsonschema.Draft202012Validator.check_schema(spec.json_schema)
        self.validator = jsonschema.Draft202012Validator(spec.json_schema)

    def grade(self, row: RLRow, completion: str) -> float:
        try:
            value = json.loads(completion.strip())
        except json.JSONDecodeError:
            return 0.0
        return 1.0 if self.validator.is_valid(value) else 0.0


class NumericCheck:
    """The first number in the completion, compared with the reference within ``tolerance``."""

    def __init__(self, spec: NumericGrader) -> None:
        self.spec = spec

    def grade(self, row: RLRow, completion: str) -> float:
        ref = float(_reference(row, self.spec.reference_field))
        match = _NUMBER.search(completion)
        if match is None:
            return 0.0
        got = float(match.group())
        return 1.0 if math.isfinite(got) and abs(got - ref) <= self.spec.tolerance else 0.0


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code >= 500


class HttpCheck:
    """POSTs ``{"prompt", "completion", "item"}`` and reads ``{"reward": float}``; retried on
    transport errors and 5xx, then a :class:`GraderFailure`."""

    def __init__(self, spec: HttpGrader, *, client: httpx.Client | None = None) -> None:
        self.spec = spec
        self.client = client or httpx.Client(timeout=spec.timeout_seconds)
        self._post = retry(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(spec.max_retries + 1),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            reraise=True,
        )(self._post_once)

    def _post_once(self, body: dict[str, Any]) -> float:
        response = self.client.post(str(self.spec.url), json=body)
        response.raise_for_status()
        reward = response.json()["reward"]
        if not isinstance(reward, int | float) or not math.isfinite(reward):
            raise GraderFailure(f"reward service returned {reward!r}", code="grader_bad_response")
        return float(reward)

    def grade(self, row: RLRow, completion: str) -> float:
        prompt = row.prompt if isinstance(row.prompt, str) else [m.model_dump() for m in row.prompt]
        try:
            return self._post({"prompt": prompt, "completion": completion, "item": row.model_extra or {}})
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            raise GraderFailure(f"reward service failed: {exc}", code="grader_unreachable") from exc


GRADERS: dict[str, Callable[[Any], Grader]] = {
    "string_check": StringCheck,
    "json_schema": JsonSchemaCheck,
    "numeric": NumericCheck,
    "http": HttpCheck,
}


def make_grader(spec: StringCheckGrader | JsonSchemaGrader | NumericGrader | HttpGrader) -> Grader:
    return GRADERS[spec.type](spec)
