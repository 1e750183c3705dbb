from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lorafleet.platform.domain.datasets import RLRow
from lorafleet.platform.domain.jobs import HttpGrader, JsonSchemaGrader, NumericGrader, StringCheckGrader
from lorafleet.services.trainer.graders import GraderFailure, make_grader

ROW = RLRow.model_validate({"prompt": "What is 2+3?", "answer": "5"})


@pytest.mark.parametrize(
    ("spec", "completion", "reward"),
    [
        (StringCheckGrader(type="string_check"), " 5 ", 1.0),
        (StringCheckGrader(type="string_check"), "5!", 0.0),
        (StringCheckGrader(type="string_check", operation="contains"), "it is 5.", 1.0),
        (StringCheckGrader(type="string_check", operation="regex", reference_field="answer"), "x5y", 1.0),
        (NumericGrader(type="numeric"), "The answer is 5.", 1.0),
        (NumericGrader(type="numeric"), "The answer is 6", 0.0),
        (NumericGrader(type="numeric", tolerance=1.5), "6.4", 1.0),
        (NumericGrader(type="numeric"), "no idea", 0.0),
        (JsonSchemaGrader(type="json_schema", json_schema={"type": "object", "required": ["a"]}), '{"a": 1}', 1.0),
        (JsonSchemaGrader(type="json_schema", json_schema={"type": "object", "required": ["a"]}), '{"b": 1}', 0.0),
        (JsonSchemaGrader(type="json_schema", json_schema={"type": "object"}), "not json", 0.0),
    ],
)
def test_builtin_graders(spec: object, completion: str, reward: float) -> None:
    assert make_grader(spec).grade(ROW, completion) == reward  # type: ignore[arg-type]


def test_missing_reference_field_is_a_failure_not_zero() -> None:
    with pytest.raises(GraderFailure) as info:
        make_grader(NumericGrader(type="numeric", reference_field="nope")).grade(ROW, "5")
    assert info.value.code == "grader_missing_reference"


class _RewardServer:
    def __init__(self, fail_first: int) -> None:
        self.calls = 0
        self.fail_first = fail_first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.calls += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.calls <= outer.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                reward = 1.0 if body["completion"].strip() == body["item"]["answer"] else 0.0
                payload = json.dumps({"reward": reward}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/reward"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def reward_server(request: pytest.FixtureRequest) -> Iterator[_RewardServer]:
    server = _RewardServer(fail_first=getattr(request, "param", 0))
    yield server
    server.server.shutdown()


@pytest.mark.parametrize("reward_server", [2], indirect=True)
def test_http_grader_retries_then_scores(reward_server: _RewardServer) -> None:
    grader = make_grader(HttpGrader(type="http", url=reward_server.url, max_retries=3))
    assert grader.grade(ROW, "5") == 1.0
    assert reward_server.calls == 3
    assert grader.grade(ROW, "4") == 0.0


@pytest.mark.parametrize("reward_server", [100], indirect=True)
def test_http_grader_gives_up_with_a_failure(reward_server: _RewardServer) -> None:
    grader = make_grader(HttpGrader(type="http", url=reward_server.url, max_retries=2))
    with pytest.raises(GraderFailure) as info:
        grader.grade(ROW, "5")
    assert info.value.code == "grader_unreachable"
    assert reward_server.calls == 3


def test_http_grader_unreachable() -> None:
    grader = make_grader(HttpGrader(type="http", url="http://127.0.0.1:9/reward", max_retries=1,
                                    timeout_seconds=1))
    with pytest.raises(GraderFailure):
        grader.grade(ROW, "5")
