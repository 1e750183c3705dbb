"""``POST /v1/chat/completions`` and ``POST /v1/completions`` over an :class:`Engine`.

The router is built per replica (:func:`openai_router`) and closes over the replica's engine,
resolver and key cache, so it can be mounted on the control plane's app (``lorafleet
up``) or on a serving-only app (``lorafleet serve``) alike. Errors are raised as
``LorafleetError``s; whichever app mounts the router maps them to status codes.

Streaming: Server-Sent Events, one ``data: {json}`` per chunk, ending with ``data: [DONE]``.
The first chunk is pulled from the engine *before* the response starts, so a request that
fails early (unknown adapter bundle, refused cold load) gets a proper status code; a failure
after that is sent as a final ``data: {"error": ...}`` event. A client that goes away, whether
streaming or not, closes the engine's iterator, which aborts the request in the engine and
frees its batch row and KV cache.
"""

# No ``from __future__ import annotations``: the endpoint signatures use a dependency alias built
# inside the router factory, which FastAPI can only see when annotations are evaluated eagerly.

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from lorafleet.platform.auth import Principal
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.errors import InvalidRequest, LorafleetError, Unavailable
from lorafleet.platform.domain.ids import new_ulid
from lorafleet.services.serving.api import schemas as s
from lorafleet.services.serving.api.auth import KeyCache, require_scope
from lorafleet.services.serving.api.resolver import Resolver, Target
from lorafleet.services.serving.engine.base import Engine, GenerationChunk, GenerationRequest, SamplingOptions

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REVISION_HEADER = "X-Lorafleet-Revision"
ADAPTER_WAIT_HEADER = "X-Lorafleet-Adapter-Wait-Seconds"
"""How long the request waited for its own adapter to load (0 when it was on the device): the
per-request form of ``lorafleet_user_visible_adapter_load_seconds``."""


@dataclass
class _Prepared:
    """A validated request, ready for the engine."""

    id: str
    created: int
    model: str
    target: Target
    request: GenerationRequest
    stream: bool
    include_usage: bool
    adapter_wait: float = 0.0
    """Set from the engine's first chunk."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)


class _FirstRequests:
    """Which revisions this process has served through a policy's pointer already: the first such
    request of each revision (the first after its flip) carries ``first_request="true"`` on the
    TTFT metric. A request naming ``policy@revision`` (the rollout's smoke check) is not counted,
    so warming a revision does not use its first request up."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def mark(self, target: Target) -> bool:
        if target.adapter is None or target.pinned or target.adapter.revision_id in self._seen:
            return False
        self._seen.add(target.adapter.revision_id)
        return True


def openai_router(*, engine: Engine, resolver: Resolver, keys: KeyCache) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["inference"])
    infer = Annotated[Principal, Depends(require_scope(keys, Scope.INFER))]
    first_requests = _FirstRequests()

    async def prepare(
        principal: Principal,
        body: s.ChatCompletionRequest | s.CompletionRequest,
        prompt_ids: Callable[[], list[int]],
        prefix: str,
    ) -> _Prepared:
        target = await anyio.to_thread.run_sync(resolver.resolve, principal.tenant_id, body.model)
        ids = prompt_ids()
        sampling = _sampling(body, prompt_tokens=len(ids), max_context=engine.max_context)
        request = GenerationRequest(
            request_id=f"{prefix}-{new_ulid()}",
            prompt_ids=ids,
            adapter=target.adapter,
            sampling=sampling,
            first_request=first_requests.mark(target),
        )
        return _Prepared(
            id=request.request_id,
            created=int(time.time()),
            model=body.model,
            target=target,
            request=request,
            stream=bool(body.stream),
            include_usage=body.include_usage,
        )

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: s.ChatCompletionRequest, principal: infer, request: Request) -> Response:
        if not body.messages:
            raise InvalidRequest("messages must contain at least one message", code="empty_messages", param="messages")
        job = await prepare(principal, body, lambda: _render_chat(engine.tokenizer, body.messages), "chatcmpl")
        if job.stream:
            return await _stream(engine, job, _chat_events(job))
        text, finish, completion_tokens = await _until_disconnected(request, lambda: _collect(engine, job))
        return _json(
            job,
            s.ChatCompletion(
                id=job.id,
                created=job.created,
                model=job.model,
                system_fingerprint=job.target.fingerprint,
                choices=[s.ChatChoice(message=s.AssistantMessage(content=text), finish_reason=finish)],
                usage=_usage(job, completion_tokens),
            ),
        )

    @router.post("/completions", response_model=None)
    async def completions(body: s.CompletionRequest, principal: infer, request: Request) -> Response:
        job = await prepare(principal, body, lambda: _encode_prompt(engine.tokenizer, body.prompt), "cmpl")
        echo = _prompt_text(engine.tokenizer, body.prompt) if body.echo else ""
        if job.stream:
            return await _stream(engine, job, _completion_events(job, echo))
        text, finish, completion_tokens = await _until_disconnected(request, lambda: _collect(engine, job))
        return _json(
            job,
            s.Completion(
                id=job.id,
                created=job.created,
                model=job.model,
                system_fingerprint=job.target.fingerprint,
                choices=[s.CompletionChoice(text=echo + text, finish_reason=finish)],
                usage=_usage(job, completion_tokens),
            ),
        )

    return router


# -- request → engine ------------------------------------------------------------------------------


def _sampling(
    body: s.ChatCompletionRequest | s.CompletionRequest, *, prompt_tokens: int, max_context: int
) -> SamplingOptions:
    if prompt_tokens == 0:
        raise InvalidRequest(
            "the prompt is empty",
            code="empty_prompt",
            param="prompt" if isinstance(body, s.CompletionRequest) else "messages",
        )
    limit = body.token_limit
    room = max_context - prompt_tokens
    if room < 1 or (limit is not None and limit > room):
        asked = prompt_tokens + (limit or 1)
        raise InvalidRequest(
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{asked} tokens ({prompt_tokens} in the prompt, {limit or 1} for the completion). "
            "Shorten the prompt or lower max_tokens.",
            code="context_length_exceeded",
            param="messages" if isinstance(body, s.ChatCompletionRequest) else "prompt",
            details={"max_context": max_context, "prompt_tokens": prompt_tokens, "max_tokens": limit},
        )
    return SamplingOptions(
        max_tokens=limit if limit is not None else room,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        seed=body.seed,
        stop=body.stop_strings,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
    )


def _render_chat(tokenizer: Any, messages: list[s.ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            "this base model has no chat template: use /v1/completions",
            code="no_chat_template",
            param="messages",
        )
    # "developer" is the newer name of "system"; base-model templates only know the older one.
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    # The template already wrote any special tokens (BOS) it wants; do not add them twice.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    vocab = len(tokenizer)
    if any(t >= vocab for t in prompt):
        raise InvalidRequest(
            f"prompt token ids must be below the vocabulary size {vocab}",
            code="invalid_token_id",
            param="prompt",
        )
    return list(prompt)


def _prompt_text(tokenizer: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else str(tokenizer.decode(prompt))


def _usage(job: _Prepared, completion_tokens: int) -> s.Usage:
    return s.Usage(
        prompt_tokens=job.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=job.prompt_tokens + completion_tokens,
    )


def _finish(chunk: GenerationChunk) -> s.FinishReason:
    if chunk.finish_reason == "abort":  # the engine dropped the request (shutting down)
        raise Unavailable("the generation was aborted by the serving engine; retry", code="generation_aborted")
    return "length" if chunk.finish_reason == "length" else "stop"


# -- running ---------------------------------------------------------------------------------------


async def _collect(engine: Engine, job: _Prepared) -> tuple[str, s.FinishReason, int]:
    parts: list[str] = []
    async with contextlib.aclosing(engine.generate(job.request)) as chunks:
        async for chunk in chunks:
            if not parts:
                job.adapter_wait = chunk.adapter_wait_seconds
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                return "".join(parts), _finish(chunk), chunk.completion_tokens
    raise Unavailable("the engine ended a generation without a finish reason", code="generation_incomplete")


async def _until_disconnected(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; if the client disconnects first, cancel it (which aborts the engine request)."""
    result: list[T] = []
    failed: list[LorafleetError] = []

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work())
        except LorafleetError as exc:
            # Raised out of the task group it would arrive wrapped in an ExceptionGroup, which the
            # error edge does not map: a refused cold load must answer 503, not 500.
            failed.append(exc)
        tg.cancel_scope.cancel()
    if failed:
        raise failed[0]
    if not result:  # nobody is listening any more; the status only shows in access logs
        raise InvalidRequest("the client disconnected before the answer was ready", code="client_disconnected")
    return result[0]


EventSource = Callable[[GenerationChunk, AsyncIterator[GenerationChunk]], AsyncIterator[str]]


async def _stream(engine: Engine, job: _Prepared, events: EventSource) -> StreamingResponse:
    chunks = engine.generate(job.request)
    try:
        first = await anext(chunks)  # errors before the first token still get a status code
    except BaseException:
        await chunks.aclose()
        raise
    job.adapter_wait = first.adapter_wait_seconds

    async def body() -> AsyncIterator[str]:
        async with contextlib.aclosing(chunks):
            try:
                async for event in events(first, chunks):
                    yield event
            except LorafleetError as exc:
                yield _sse(exc.to_body())
                return
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **_headers(job)},
    )


async def _all(first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    yield first
    if first.finish_reason is None:
        async for chunk in rest:
            yield chunk
            if chunk.finish_reason is not None:
                return


def _chat_events(job: _Prepared) -> EventSource:
    def chunk(
        delta: s.ChatDelta,
        finish: s.FinishReason | None = None,
        usage: s.Usage | None = None,
        last: bool = False,
    ) -> str:
        choices = [] if last else [s.ChatChunkChoice(delta=delta, finish_reason=finish)]
        return _sse(
            s.ChatCompletionChunk(
                id=job.id,
                created=job.created,
                model=job.model,
                choices=choices,
                usage=usage,
                system_fingerprint=job.target.fingerprint,
            )
        )

    async def events(first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[str]:
        yield chunk(s.ChatDelta(role="assistant", content=""))
        async for c in _all(first, rest):
            if c.text:
                yield chunk(s.ChatDelta(content=c.text))
            if c.finish_reason is not None:
                yield chunk(s.ChatDelta(), finish=_finish(c))
                if job.include_usage:
                    yield chunk(s.ChatDelta(), usage=_usage(job, c.completion_tokens), last=True)

    return events


def _completion_events(job: _Prepared, echo: str) -> EventSource:
    def chunk(text: str, finish: s.FinishReason | None = None, usage: s.Usage | None = None, last: bool = False) -> str:
        choices = [] if last else [s.CompletionChoice(text=text, finish_reason=finish)]
        return _sse(
            s.Completion(
                id=job.id,
                created=job.created,
                model=job.model,
                choices=choices,
                usage=usage,
                system_fingerprint=job.target.fingerprint,
            )
        )

    async def events(first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[str]:
        if echo:
            yield chunk(echo)
        async for c in _all(first, rest):
            if c.finish_reason is not None:
                yield chunk(c.text, finish=_finish(c))
                if job.include_usage:
                    yield chunk("", usage=_usage(job, c.completion_tokens), last=True)
            elif c.text:
                yield chunk(c.text)

    return events


def _sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def _json(job: _Prepared, payload: s.ChatCompletion | s.Completion) -> Response:
    return Response(
        payload.model_dump_json(),
        media_type="application/json",
        headers=_headers(job),
    )


def _headers(job: _Prepared) -> dict[str, str]:
    return {REVISION_HEADER: job.target.fingerprint, ADAPTER_WAIT_HEADER: f"{job.adapter_wait:.6f}"}
