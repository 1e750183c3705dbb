"""Dataset rows and the JSONL validator used at upload time (and by the trainer to read rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.platform.domain.enums import FileKind

MAX_REPORTED_ERRORS = 50


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(BaseModel):
    """Chat SFT: the loss is taken on assistant messages only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    messages: list[ChatMessage] = Field(min_length=1)


class PromptCompletionRow(BaseModel):
    """Plain SFT: the loss is taken on the completion only."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: str
    completion: str = Field(min_length=1)


Prompt = str | list[ChatMessage]


class PreferenceRow(BaseModel):
    """DPO: the chosen completion should become likelier than the rejected one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prompt: Prompt
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


class RLRow(BaseModel):
    """RL: a prompt plus whatever fields the grader reads (for example ``answer``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    prompt: Prompt

    def field(self, name: str) -> Any:
        return (self.model_extra or {}).get(name)


ROW_MODELS: dict[FileKind, type[BaseModel]] = {
    FileKind.SFT_CHAT: ChatRow,
    FileKind.SFT_PROMPT: PromptCompletionRow,
    FileKind.DPO: PreferenceRow,
    FileKind.RL: RLRow,
}


@dataclass
class LineError:
    line: int
    """1-based line number; 0 for errors about the file as a whole."""
    code: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message}


@dataclass
class ValidationReport:
    kind: FileKind | None = None
    rows: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.rows > 0

    def add(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


def classify_row(obj: dict[str, Any]) -> FileKind | None:
    if "messages" in obj:
        return FileKind.SFT_CHAT
    if "prompt" in obj and "chosen" in obj and "rejected" in obj:
        return FileKind.DPO
    if "prompt" in obj and "completion" in obj:
        return FileKind.SFT_PROMPT
    if "prompt" in obj:
        return FileKind.RL
    return None


def _row_error(line: int, exc: ValidationError) -> LineError:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if "role" in loc:
        return LineError(line, "invalid_role", f"{loc}: role must be system, user or assistant")
    if first["type"] == "extra_forbidden":
        return LineError(line, "unknown_field", f"unknown field {loc!r}")
    if first["type"] == "missing":
        return LineError(line, "missing_field", f"missing field {loc!r}")
    return LineError(line, "invalid_field", f"{loc}: {first['msg']}")


def validate_row(kind: FileKind, obj: dict[str, Any], line: int) -> LineError | None:
    try:
        row = ROW_MODELS[kind].model_validate(obj)
    except ValidationError as exc:
        return _row_error(line, exc)
    if isinstance(row, ChatRow):
        if not any(m.role == "assistant" for m in row.messages):
            return LineError(line, "missing_assistant", "a chat row needs at least one assistant message")
        if row.messages[-1].role != "assistant":
            return LineError(line, "last_message_not_assistant", "a chat row must end with an assistant message")
    return None


def validate_jsonl(data: bytes) -> ValidationReport:
    """Check every line; the file's kind is set by its first valid row and all rows must match it."""
    report = ValidationReport()
    if not data.strip():
        report.add(LineError(0, "empty_file", "the file has no rows"))
        return report
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        report.add(LineError(0, "invalid_encoding", f"the file is not UTF-8: {exc}"))
        return report
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            report.add(LineError(number, "invalid_json", f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(obj, dict):
            report.add(LineError(number, "not_an_object", "each line must be a JSON object"))
            continue
        kind = classify_row(obj)
        if kind is None:
            report.add(LineError(number, "unknown_row_format",
                                 "expected messages, prompt+completion, prompt+chosen+rejected, or prompt"))
            continue
        if report.kind is None:
            report.kind = kind
        elif kind != report.kind:
            report.add(LineError(number, "mixed_row_formats", f"row is {kind}, the file is {report.kind}"))
            continue
        error = validate_row(kind, obj, number)
        if error is not None:
            report.add(error)
            continue
        report.rows += 1
    if report.rows == 0 and report.error_count == 0:
        report.add(LineError(0, "empty_file", "the file has no rows"))
    return report


def iter_rows(kind: FileKind, data: bytes) -> list[BaseModel]:
    """Parse an already validated file into row models."""
    model = ROW_MODELS[kind]
    return [model.model_validate_json(line) for line in data.decode("utf-8").splitlines() if line.strip()]
