"""The OpenAI-compatible endpoints, served by a real uvicorn server (the control plane's app with the
serving routers mounted, as ``lorafleet up`` runs it) over the torch engine and tiny-moe, driven by
the official ``openai`` client and by raw HTTP where status codes and bodies matter."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from lorafleet.platform.config import Settings
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.platform.metrics import GEN_REQUESTS
from lorafleet.services.api import create_app
from lorafleet.services.serving.engine.torch_engine import TorchEngine
from lorafleet.services.serving.replica import ServingOptions, ServingReplica, build_serving
from tests.services.serving._http_support import LiveServer, Seeded, fresh_database, seed, torch_engine
from tests.services.serving.conftest import (
    BASE_MODEL_ID,
    AdapterStore,
    ServingBase,
    publish_adapter,
    trained_like_adapter,
)

pytestmark = pytest.mark.integration

GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@dataclass
class Served:
    url: str
    db: Seeded
    replica: ServingReplica
    engine: TorchEngine

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.db.infer_key, max_retries=0)

    def post(self, path: str, body: dict[str, Any], key: str | None = None) -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key or self.db.infer_key}"},
        )

    def revision(self, policy: str, index: int = 0) -> str:
        return self.db.policies[policy][index].handle.revision_id


@pytest.fixture(scope="module")
def served(
    serving_base: ServingBase, serving_adapters: AdapterStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("openai")
    adapters = serving_adapters.adapters
    # A strong second revision: a random adapter of the usual scale may leave the base's most
    # confident answers as they are, and the test below must tell the three models apart.
    lora = LoraConfig(rank=4, alpha=8.0)
    strong = {
        k: t * (4.0 if k.endswith("lora_B") else 1.0)
        for k, t in trained_like_adapter(serving_base.spec, lora, seed=901).items()
    }
    second = publish_adapter(
        serving_adapters.store,
        serving_base,
        serving_adapters.workdir,
        policy=adapters[0].handle.policy or "",
        rank=4,
        seed=901,
        tensors=strong,
    )
    policies = {"policy-0": [adapters[0], second], "policy-1": [adapters[1]], "idle": []}
    with fresh_database() as url:
        db = seed(url, serving_base, policies)
        settings = Settings(data_dir=tmp / "lf", database_url=url)
        engine = torch_engine(serving_base, serving_adapters.store, tmp / "cache")
        # A long pointer TTL, so the flip test sees the cache until it invalidates it.
        options = ServingOptions(serving_resolve_ttl_seconds=300, serving_heartbeat_seconds=60)
        replica = build_serving(
            settings, sessions=db.sessions, store=serving_adapters.store, engine=engine, options=options
        )
        server = LiveServer(create_app(settings, extra_routers=replica.routers))
        try:
            yield Served(server.url, db, replica, engine)
        finally:
            server.stop()


def _expected_prompt_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_openai_client_chat_and_completions_by_base_policy_and_pinned_revision(
    served: Served, serving_base: ServingBase
) -> None:
    client = served.client()
    answers = {}
    for model in (BASE_MODEL_ID, "policy-0", f"policy-0@{served.revision('policy-0', 1)}"):
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, **GREEDY)
        assert chat.object == "chat.completion" and chat.model == model
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None
        assert chat.usage.prompt_tokens == _expected_prompt_tokens(served.engine.tokenizer, MESSAGES)
        assert chat.usage.completion_tokens == 8
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8
        answers[model] = chat.choices[0].message.content
        done = client.completions.create(model=model, prompt="the cat number", max_tokens=6, **GREEDY)
        assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 6
        assert done.usage.prompt_tokens == len(serving_base.tokenizer.encode("the cat number"))
    # the served revision is reported, and each adapter changes what the base says
    assert client.chat.completions.create(
        model="policy-0", messages=MESSAGES, max_tokens=1
    ).system_fingerprint == served.revision("policy-0")
    assert len(set(answers.values())) == 3, answers


def test_streaming_agrees_with_non_streaming_for_both_endpoints(served: Served) -> None:
    client = served.client()
    for model in (BASE_MODEL_ID, "policy-1"):
        whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, **GREEDY)
        stream = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text == whole.choices[0].message.content
        assert finish == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert {c.id for c in chunks} == {chunks[0].id}

        whole_c = client.completions.create(model=model, prompt="the dog number", max_tokens=12, **GREEDY)
        stream_c = list(
            client.completions.create(model=model, prompt="the dog number", max_tokens=12, stream=True, **GREEDY)
        )
        assert "".join(c.choices[0].text for c in stream_c if c.choices) == whole_c.choices[0].text
        assert stream_c[-1].choices[0].finish_reason == whole_c.choices[0].finish_reason
        assert all(c.usage is None for c in stream_c)  # usage only when asked for


def test_sse_wire_format_ends_with_done(served: Served) -> None:
    body = {"model": BASE_MODEL_ID, "prompt": "the bird", "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream(
        "POST",
        f"{served.url}/v1/completions",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {served.db.infer_key}"},
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_stop_strings_max_tokens_and_echo(served: Served) -> None:
    client = served.client()
    full = client.completions.create(model="policy-1", prompt="the sky is", max_tokens=16, **GREEDY)
    text = full.choices[0].text
    assert len(text) >= 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model="policy-1", prompt="the sky is", max_tokens=16, stop=[stop], **GREEDY)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens < 16
    streamed = client.completions.create(
        model="policy-1", prompt="the sky is", max_tokens=16, stop=stop, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]

    echoed = client.completions.create(model="policy-1", prompt="the sky is", max_tokens=16, echo=True, **GREEDY)
    assert echoed.choices[0].text == "the sky is" + text


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "param"} <= set(body["error"]), body
    return dict(body["error"])


def test_unknown_and_foreign_models_are_the_same_404(served: Served) -> None:
    chat = {"messages": MESSAGES, "max_tokens": 2}
    unknown = served.post("/v1/chat/completions", {"model": "no-such-policy", **chat})
    foreign = served.post("/v1/chat/completions", {"model": "secret", **chat})
    assert unknown.status_code == foreign.status_code == 404
    assert _error(unknown)["code"] == _error(foreign)["code"] == "model_not_found"
    assert _error(foreign)["message"] == _error(unknown)["message"].replace("no-such-policy", "secret")
    # the other tenant cannot name this tenant's policy or its revisions either
    for model in ("policy-0", f"policy-0@{served.revision('policy-0')}"):
        r = served.post("/v1/chat/completions", {"model": model, **chat}, key=served.db.other_key)
        assert r.status_code == 404 and _error(r)["code"] == "model_not_found"
    # a revision of another policy of the same tenant is not a revision of this one
    r = served.post("/v1/completions", {"model": f"policy-0@{served.revision('policy-1')}", "prompt": "x"})
    assert r.status_code == 404
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="secret", prompt="x", max_tokens=1)
    idle = served.post("/v1/completions", {"model": "idle", "prompt": "x"})
    assert idle.status_code == 409 and _error(idle)["code"] == "policy_not_serving"


def test_bad_input_answers_400_or_422_with_stable_codes(served: Served) -> None:
    base = {"model": BASE_MODEL_ID, "max_tokens": 2}
    empty = served.post("/v1/chat/completions", {**base, "messages": []})
    assert empty.status_code == 400 and _error(empty)["code"] == "empty_messages"

    long_prompt = "the cat number 7 " * 200
    r = served.post("/v1/completions", {**base, "prompt": long_prompt})
    err = _error(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert f"maximum context length is {served.engine.max_context} tokens" in err["message"]
    assert err["details"]["max_context"] == served.engine.max_context
    r = served.post("/v1/completions", {**base, "prompt": "hi", "max_tokens": served.engine.max_context})
    assert r.status_code == 400 and _error(r)["code"] == "context_length_exceeded"

    for bad in (
        {"temperature": -1},
        {"temperature": 3},
        {"top_p": 0},
        {"max_tokens": 0},
        {"n": 2},
        {"presence_penalty": 0.5},
        {"logprobs": True},
        {"tools": [{"type": "function"}]},
        {"response_format": {"type": "json_object"}},
        {"stop": [""]},
        {"repetition_penalty": 1.2},
    ):
        r = served.post("/v1/chat/completions", {**base, "messages": MESSAGES, **bad})
        assert r.status_code == 422, (bad, r.text)
        assert _error(r)["code"] == "invalid_request_schema"
    r = served.post("/v1/completions", {**base, "prompt": ["one", "two"]})
    assert r.status_code == 422
    r = served.post("/v1/completions", {**base, "prompt": [10**9]})
    assert r.status_code == 400 and _error(r)["code"] == "invalid_token_id"

    # what OpenAI clients send routinely is tolerated
    ok = served.post(
        "/v1/chat/completions",
        {
            **base,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "hi"}]},
            ],
            "user": "u-1",
            "store": False,
            "metadata": {"k": "v"},
            "n": 1,
            "presence_penalty": 0,
            "tool_choice": "none",
        },
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["x-lorafleet-revision"] == BASE_MODEL_ID


def test_keys_need_the_infer_scope(served: Served) -> None:
    body = {"model": BASE_MODEL_ID, "prompt": "x", "max_tokens": 1}
    assert served.post("/v1/completions", body, key="lf_not-a-key").status_code == 401
    r = served.post("/v1/completions", body, key=served.db.read_key)
    assert r.status_code == 403 and _error(r)["code"] == "insufficient_scope"
    assert httpx.post(f"{served.url}/v1/completions", json=body).status_code == 401


def _idle(engine: TorchEngine, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.load_factor() == (0, 0) and all(a.in_flight == 0 for a in engine.resident()):
            return True
        time.sleep(0.02)
    return False


def _aborted() -> float:
    return GEN_REQUESTS.labels(outcome="abort")._value.get()  # type: ignore[attr-defined, no-any-return]


def test_client_disconnect_mid_stream_frees_the_row_and_the_adapter(served: Served) -> None:
    assert _idle(served.engine)
    aborted = _aborted()
    body = {
        "model": "policy-1",
        "prompt": "the cat",
        "max_tokens": 240,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST",
        f"{served.url}/v1/completions",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {served.db.infer_key}"},
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: dropping it would close the connection early
        received = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert received
        running, _ = served.engine.load_factor()
        in_use = {a.revision_id: a.in_flight for a in served.engine.resident()}
        assert running == 1 and in_use[served.revision("policy-1")] == 1
    # the connection is closed long before 240 tokens: the engine must drop the row and release the adapter
    assert _idle(served.engine), (served.engine.load_factor(), served.engine.resident())
    assert _aborted() == aborted + 1  # it was aborted, not run to its end


def test_pointer_flip_is_seen_after_invalidation(served: Served) -> None:
    client = served.client()
    old, new = served.revision("policy-0", 0), served.revision("policy-0", 1)

    def fingerprint() -> str | None:
        return client.completions.create(model="policy-0", prompt="x", max_tokens=1).system_fingerprint

    assert fingerprint() == old
    served.db.set_serving("policy-0", new)
    try:
        assert fingerprint() == old  # cached pointer (TTL 300 s in this module)
        served.replica.resolver.invalidate(served.db.policies["policy-0"][0].handle.tenant_id or "", "policy-0")
        assert fingerprint() == new
        pinned = client.completions.create(model=f"policy-0@{old}", prompt="x", max_tokens=1)
        assert pinned.system_fingerprint == old
    finally:
        served.db.set_serving("policy-0", old)
        served.replica.resolver.invalidate_all()


def test_serving_only_app_answers_with_the_same_error_edge(
    served: Served, serving_base: ServingBase, serving_adapters: AdapterStore, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from lorafleet.services.api.errors import STATUS as CONTROL_PLANE_STATUS
    from lorafleet.services.serving.api.errors import STATUS as SERVING_STATUS
    from lorafleet.services.serving.replica import create_serving_app

    assert SERVING_STATUS == CONTROL_PLANE_STATUS
    settings = Settings(data_dir=tmp_path / "lf", database_url="")
    replica = build_serving(
        settings,
        sessions=served.db.sessions,
        store=serving_adapters.store,
        engine=torch_engine(serving_base, serving_adapters.store, tmp_path / "cache"),
        options=ServingOptions(serving_heartbeat_seconds=60),
    )
    with TestClient(create_serving_app(replica)) as http:
        auth = {"Authorization": f"Bearer {served.db.infer_key}"}
        assert http.get("/healthz").json()["replica_id"] == replica.replica_id
        r = http.post("/v1/completions", json={"model": "policy-1", "prompt": "the cat", "max_tokens": 3}, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        r = http.post("/v1/completions", json={"model": "secret", "prompt": "x"}, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = http.post("/v1/chat/completions", json={"model": "policy-1", "messages": [], "max_tokens": 1}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_messages"
        assert "lorafleet_ttft_seconds" in http.get("/metrics").text


def test_client_disconnect_before_a_non_streamed_answer_aborts_it(served: Served) -> None:
    assert _idle(served.engine)
    aborted = _aborted()
    body = {
        "model": BASE_MODEL_ID,
        "prompt": "the cat",
        "max_tokens": 250,  # nearly the engine's 256-token context
        "ignore_eos": True,
        "temperature": 0,
    }
    # The client gives up long before 250 tokens are ready: a short read timeout, since a quiet
    # machine decodes one tiny-moe row in about 2 ms a token.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{served.url}/v1/completions",
            json=body,
            timeout=httpx.Timeout(30, read=0.15),
            headers={"Authorization": f"Bearer {served.db.infer_key}"},
        )
    assert _idle(served.engine, timeout=3.0), served.engine.load_factor()
    assert _aborted() == aborted + 1


def test_resolver_reads_a_flipped_pointer_once_its_ttl_expires(served: Served) -> None:
    from lorafleet.platform.domain.errors import NotFound
    from lorafleet.services.serving.api import Resolver

    now = [1000.0]
    resolver = Resolver(
        served.db.sessions, served_base_ids=frozenset({BASE_MODEL_ID}), ttl_seconds=5, clock=lambda: now[0]
    )
    tenant = served.db.policies["policy-0"][0].handle.tenant_id or ""
    old, new = served.revision("policy-0", 0), served.revision("policy-0", 1)
    assert resolver.resolve(tenant, "policy-0").fingerprint == old
    served.db.set_serving("policy-0", new)
    try:
        now[0] += 4.9
        assert resolver.resolve(tenant, "policy-0").fingerprint == old
        now[0] += 0.2
        target = resolver.resolve(tenant, "policy-0")
        assert target.fingerprint == new and target.policy == "policy-0" and target.adapter is not None
        served.db.set_serving("policy-0", old)
        resolver.invalidate(tenant)  # every policy of the tenant
        assert resolver.resolve(tenant, "policy-0").fingerprint == old
    finally:
        served.db.set_serving("policy-0", old)
    elsewhere = Resolver(served.db.sessions, served_base_ids=frozenset({"another-base"}))
    with pytest.raises(NotFound) as refused:
        elsewhere.resolve(tenant, "policy-0")
    assert refused.value.code == "model_not_served"
