"""Wire shapes of the OpenAI-compatible endpoints: requests, responses, stream chunks.

What is accepted, and why (the rule: a field lorafleet cannot honour is refused with 422 when
honouring it would change the generated text or the response's meaning; a field that changes
neither is tolerated and ignored, because OpenAI clients send it routinely):

- honoured: ``model``, ``messages`` / ``prompt``, ``max_tokens`` / ``max_completion_tokens``,
  ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``, ``stream_options.include_usage``,
  ``n`` (only 1), ``echo`` (completions), and two widely used vLLM extensions, ``top_k`` and
  ``stop_token_ids`` (plus ``ignore_eos``).
- tolerated and ignored: ``user``, ``metadata``, ``store``, ``service_tier``,
  ``parallel_tool_calls``, ``prompt_cache_key``, ``safety_identifier``,
  ``stream_options.include_obfuscation``; on messages ``name`` and the null/empty echoes of an
  earlier assistant turn (``refusal``, ``tool_calls``, ``function_call``, ``audio``, ``annotations``).
- refused (422) unless at their neutral value: ``presence_penalty`` / ``frequency_penalty``
  (only 0), ``logit_bias`` (only empty), ``logprobs`` / ``top_logprobs``, ``best_of`` (only 1),
  ``suffix``, ``tools`` / ``functions`` (only empty), ``tool_choice`` (only ``"none"``),
  ``response_format`` (only ``{"type": "text"}``), ``modalities`` (only ``["text"]``), and
  any field not named here (``extra="forbid"``), such as ``prediction`` or ``audio``.

Request-level problems that are not schema problems answer 400 from the route (empty
``messages``, a prompt longer than the context); schema problems answer 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- requests --------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    """Send one last chunk with ``usage`` (and no choices) before ``[DONE]``."""
    include_obfuscation: bool | None = None
    """Accepted and ignored: lorafleet does not pad chunks."""


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    """Text, or a list of text parts (joined); image and audio parts are refused."""
    name: str | None = None
    """Accepted and ignored: chat templates of the served bases do not render it."""
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: None = None
    audio: None = None
    annotations: list[Any] | None = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("tool calls are not supported")
        return v

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


def _neutral(value: Any, neutral: tuple[Any, ...], what: str) -> Any:
    if value not in neutral:
        raise ValueError(f"{what} is not supported by lorafleet's engines")
    return value


class _SamplingFields(BaseModel):
    """What both endpoints share: sampling, stopping, streaming, and the tolerated extras."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300)
    """A base model id, a policy name (its serving revision), or ``policy@revision``."""
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    """0 is greedy; default 1."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    """vLLM extension; 0 or -1 means no top-k cut."""
    seed: int | None = None
    stop: str | list[str] | None = None
    """Up to 16 strings; generation ends before the first occurrence (not included)."""
    stop_token_ids: list[int] | None = Field(default=None, max_length=64)
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        return _neutral(v, (None, 1), "n other than 1")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        return _neutral(v, (None, 0, 0.0), "a nonzero presence or frequency penalty")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return _neutral(v or None, (None,), "logit_bias")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else v or []
        if len(items) > 16:
            raise ValueError("at most 16 stop strings")
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    """Only plain text; JSON modes would change what is generated."""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    """Rendered with the base model's chat template; must not be empty (400)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Default: whatever of the context the prompt leaves."""
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """The newer name of ``max_tokens``; when both are given they must agree."""
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Literal["none"] | None = None
    """Only ``"none"``: there are no tools."""
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        return _neutral(v, (None, False), "logprobs")

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        return _neutral(v, (None, 0), "top_logprobs")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None) -> list[Any] | None:
        return _neutral(v or None, (None,), "tool calling")

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# A completion prompt: text, or token ids; a list of one is accepted as the same prompt.
PromptText = Annotated[str, Field(max_length=1_000_000)]
PromptIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]


class CompletionRequest(_SamplingFields):
    prompt: PromptText | PromptIds | list[PromptText] | list[PromptIds]
    """One prompt per request (text or token ids); several prompts are refused (422)."""
    max_tokens: int | None = Field(default=16, ge=1)
    """OpenAI's default for this endpoint is 16."""
    echo: bool = False
    """Prepend the prompt to the returned text."""
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        return _neutral(v, (None, 1), "best_of other than 1")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        return _neutral(v, (None,), "logprobs")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return _neutral(v or None, (None,), "suffix (insertion)")

    @field_validator("prompt")
    @classmethod
    def _single(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError("one prompt per request: send several requests to batch")
            return v[0]
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


# -- responses -------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    """The adapter revision that answered, or the base model id for a base-model request."""


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Both the whole answer and a stream chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
