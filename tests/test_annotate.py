"""Annotators: strict parsing of model replies, the API annotator's fault handling against a loopback
OpenAI-compatible server, self-annotation through the rollout engine, and a training run that keeps going
while its annotator fails."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("transformers")

from trace_train import arith  # noqa: E402
from trace_train.annotate import (  # noqa: E402
    AnnotationError,
    ApiAnnotator,
    Job,
    SelfAnnotator,
    annotation_prompt,
    parse_annotation,
    segments,
)
from trace_train.tasks import ArithTask  # noqa: E402

DIAG = arith.DIAGNOSTICS
RESPONSE = "3+4=7,7*2=4;4"


def test_segments_and_prompt():
    assert [RESPONSE[s:e] for s, e in segments(RESPONSE)] == ["3+4=7,", "7*2=4;", "4"]
    text = "First line.\n\nx = 2, so y = 4"
    assert [text[s:e] for s, e in segments(text)] == ["First line.", "x = 2,", " so y = 4"]
    p = annotation_prompt("3+4*2", RESPONSE, False, DIAG)
    assert "[1] 7*2=4;" in p and DIAG[1] in p and "incorrect" in p
    assert "key steps" in annotation_prompt("3+4*2", RESPONSE, True, DIAG)


@pytest.mark.parametrize("reply,correct,key,err,diag", [
    ('{"segments": [1]}', True, [(6, 12)], [], None),
    ('```json\n{"quotes": ["=4;4"]}\n```', True, [(9, 13)], [], None),
    (f'{{"segments": [0], "quotes": ["7*2"], "diagnostic": "{DIAG[1]}"}}', False, [], [(0, 6), (6, 9)], DIAG[1]),
])
def test_parse_annotation_accepts(reply, correct, key, err, diag):
    a = parse_annotation(reply, RESPONSE, correct, DIAG)
    assert (a.key_spans, a.error_spans, a.diagnostic) == (key, err, diag)


@pytest.mark.parametrize("reply,correct,match", [
    ("the second step", True, "not JSON"),
    ("[1, 2]", True, "not a JSON object"),
    ('{"segments": [3]}', True, "out of range"),
    ('{"segments": ["1"]}', True, "list of integers"),
    ('{"segments": [true]}', True, "list of integers"),
    ('{"quotes": ["7*3"]}', True, "quote not found"),
    ('{"quotes": [""]}', True, "non-empty strings"),
    ('{"segments": []}', True, "no spans"),
    ('{"segments": [1], "why": "x"}', True, "unknown keys"),
    ('{"segments": [1]}', False, "diagnostic"),
    ('{"segments": [1], "diagnostic": "bad luck"}', False, "diagnostic"),
])
def test_parse_annotation_is_strict(reply, correct, match):
    with pytest.raises(AnnotationError, match=match):
        parse_annotation(reply, RESPONSE, correct, DIAG)


class _Server:
    """A loopback OpenAI-compatible endpoint that answers each request with the next scripted behaviour:
    a reply string, ("status", code), ("sleep", seconds) or ("raw", bytes); once the script runs out,
    `default` (a function of the prompt) answers."""

    def __init__(self, script=(), default=None):
        self.script, self.default, self.requests = list(script), default, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, self.headers.get("Authorization"), body))
                prompt = body["messages"][0]["content"]
                action = server.script.pop(0) if server.script else server.default(prompt)
                if isinstance(action, tuple) and action[0] == "sleep":
                    time.sleep(action[1])
                    action = '{"segments": [0]}'
                if isinstance(action, tuple) and action[0] == "status":
                    self.send_response(action[1])
                    self.end_headers()
                    return
                payload = action[1] if isinstance(action, tuple) else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(script=(), default=None):
        made.append(_Server(script, default))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _api(url, **kw):
    kw = {"timeout": 2.0, "retries": 1, "workers": 1, **kw}
    return ApiAnnotator(ArithTask(), url, "annotator-model", api_key="sk-test", **kw)


JOB = Job("3+4*2", RESPONSE, True)


def test_api_annotator_request_and_success(server):
    s = server(['{"segments": [1]}'])
    out, failures = _api(s.url)([JOB], [None])
    assert failures == 0 and out[0].key_spans == [(6, 12)]
    path, auth, body = s.requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "annotator-model"
    assert "[1] 7*2=4;" in body["messages"][0]["content"]


@pytest.mark.parametrize("script,failed,requests", [
    ([("status", 500), '{"segments": [1]}'], False, 2),  # an HTTP error, then success on the retry
    ([("status", 500), ("status", 503)], True, 2),  # errors on every attempt
    (["not json", "still not json"], True, 2),  # malformed output
    (['{"quotes": ["nowhere"]}'] * 2, True, 2),  # a span that is not in the response
    ([("raw", b"{}"), ("raw", b"<html>")], True, 2),  # a reply without choices, then not JSON at all
    ([("sleep", 3.0), ("sleep", 3.0)], True, 2),  # timeouts
])
def test_api_annotator_faults_leave_the_rollout_without_spans(server, script, failed, requests):
    s = server(script)
    out, failures = _api(s.url, timeout=1.0)([JOB], [None])
    assert failures == int(failed) and (out[0] is None) == failed and len(s.requests) == requests


def test_api_annotator_unreachable_endpoint_counts_failures():
    out, failures = _api("http://127.0.0.1:9", retries=0)([JOB, JOB], [None, None])
    assert out == [None, None] and failures == 2


def test_self_annotator_parses_its_own_generations():
    """The policy's generations go through the same strict parser: a scripted 'policy' answers twice."""
    class Engine:
        def generate(self, prompts, k, seeds):
            from trace_train.rollout import Rollouts

            replies = ['{"segments": [0]}', "no idea"]
            return Rollouts(prompts, [list(r.encode()) for r in replies], [], [True, True])

    class Tok:
        def __call__(self, text):
            return {"input_ids": list(text.encode())}

        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode()

    ann = SelfAnnotator(ArithTask(), Engine(), Tok(), chat=lambda s: s)
    out, failures = ann([JOB, JOB], [None, None], seeds=[0, 1])
    assert out[0].key_spans == [(0, 6)] and out[1] is None and failures == 1


def _oracle(prompt: str):
    """A good annotator for the toy task on half of the requests, a failing one on the other half."""
    _oracle.n = getattr(_oracle, "n", 0) + 1
    if _oracle.n % 2:
        return ("status", 500)
    if "is correct" in prompt:
        return '{"segments": [0]}'
    return json.dumps({"segments": [0], "diagnostic": DIAG[2]})


def test_training_continues_through_annotator_failures(server, tmp_path):
    from trace_train.config import load_config
    from trace_train.train import run

    s = server(default=_oracle)
    cfg = load_config("toy", [
        f"train.output_dir={tmp_path}", "train.max_steps=2", "train.prompts_per_step=2", "train.rollouts_per_prompt=4",
        "train.max_new_tokens=12", "trace.annotator=api", f"trace.api_base_url={s.url}", "trace.api_retries=0",
        "trace.reverse_kl=true", "train.export_hf=false"])
    history = run(cfg)
    assert len(history) == 2
    assert sum(m["annotator_failures"] for m in history) > 0
    assert sum(m["annotated_rollouts"] for m in history) > 0 and any(m["span_fraction"] > 0 for m in history)
    assert all(m["annotated_rollouts"] + m["annotator_failures"] <= 8 for m in history)


def test_self_annotation_in_the_loop_counts_unparseable_replies(tmp_path):
    """trace.annotator=self through the real engine: an untrained policy cannot write the JSON, so every
    rollout's annotation fails, is counted, and the step still trains (GRPO on all tokens, no KL rows)."""
    from trace_train.config import load_config
    from trace_train.train import run

    cfg = load_config("toy", [
        f"train.output_dir={tmp_path}", "train.max_steps=1", "train.prompts_per_step=2", "train.rollouts_per_prompt=2",
        "train.max_new_tokens=8", "trace.annotator=self", "trace.reverse_kl=true", "train.export_hf=false"])
    (m,) = run(cfg)
    assert m["annotator_failures"] == 4 and m["annotated_rollouts"] == 0
    assert m["span_fraction"] == 0 and m["teacher_rollouts"] == 0 and m["grad_norm"] >= 0
