"""Annotators: strict parsing of model replies, the API annotator's fault handling against a loopback
OpenAI-compatible server, self-annotation through the rollout engine, and a training run that keeps going
while its annotator fails."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("transformers")

from trace_train import annotate  # noqa: E402
from trace_train.annotate import (  # noqa: E402
    AnnotationError,
    ApiAnnotator,
    Job,
    SelfAnnotator,
    annotation_prompt,
    parse_annotation,
    segments,
)
from trace_train.tasks import ArithTask, arith  # noqa: E402

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
    """A loopback OpenAI-compatible endpoint that answers each request with the next scripted behaviour;
    once the script runs out, `default` (a function of the prompt) answers. Behaviours:
    a content string (a well-formed reply carrying it), ("json", obj) (obj as the reply), ("raw", bytes)
    (a 200 with this body), ("status", code[, headers]), ("sleep", seconds) (then a good reply),
    ("wire", bytes) (these bytes on the socket, nothing else, then close) and
    ("drip", head, body, seconds) (head, then body one byte every `seconds`)."""

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
                kind = action[0] if isinstance(action, tuple) else "content"
                if kind == "sleep":
                    time.sleep(action[1])
                    action, kind = '{"segments": [0]}', "content"
                if kind == "status":
                    self.send_response(action[1])
                    for k, v in (action[2] if len(action) > 2 else {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if kind in ("wire", "drip"):
                    self.close_connection = True
                    try:
                        self.wfile.write(action[1])
                        self.wfile.flush()
                        for i in range(len(action[2]) if kind == "drip" else 0):
                            time.sleep(action[3])
                            self.wfile.write(action[2][i:i + 1])
                            self.wfile.flush()
                    except OSError:  # the client gave up
                        pass
                    return
                payload = {"raw": lambda: action[1], "json": lambda: json.dumps(action[1]).encode(),
                           "content": lambda: json.dumps(
                               {"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()}[kind]()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Quiet(ThreadingHTTPServer):
            request_queue_size = 64  # the default 5 drops connections when 16 jobs connect at once

            def handle_error(self, request, client_address):
                pass  # a client that hung up on a dripping reply is the point of the test

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
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


KEY = "sk-test-3f9a"


def _api(url, **kw):
    kw = {"timeout": 2.0, "retries": 1, "workers": 1, **kw}
    return ApiAnnotator(ArithTask(), url, "annotator-model", api_key=KEY, **kw)


JOB = Job("3+4*2", RESPONSE, True)
# An allowance over each deadline for a loaded machine (a trivial exchange once took 3.9 s against a 1.5 s
# deadline while 2 compile processes and 3 test runs shared its 2 cores); every unbounded behaviour below
# takes far longer than deadline + slack, so the tests still tell bounded from unbounded.
SLACK_S = 3.0


def test_api_annotator_request_and_success(server, caplog):
    s = server(['{"segments": [1]}'])
    out, failures = _api(s.url)([JOB], [None])
    assert failures == Counter() and out[0].key_spans == [(6, 12)] and not caplog.records
    path, auth, body = s.requests[0]
    assert path == "/v1/chat/completions" and auth == f"Bearer {KEY}" and body["model"] == "annotator-model"
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
    assert failures.total() == int(failed) and (out[0] is None) == failed and len(s.requests) == requests


NESTED = "[" * 200_000 + "]" * 200_000
CAP = 1 << 20  # the default max_reply_bytes
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
GOOD = json.dumps({"choices": [{"message": {"content": '{"segments": [1]}'}}]}).encode()

FAULTS = {  # name: (behaviour, failure kind); each with timeout 1 s, deadline 1.5 s, no retries, a 1 MB cap
    "content null": (("json", {"choices": [{"message": {"role": "assistant", "content": None}}]}), "parse"),
    "content number": (("json", {"choices": [{"message": {"content": 7}}]}), "parse"),
    "content object": (("json", {"choices": [{"message": {"content": {"segments": [1]}}}]}), "parse"),
    "message null": (("json", {"choices": [{"message": None}]}), "parse"),
    "choices empty": (("json", {"choices": []}), "parse"),
    "reply a list": (("json", [1, 2]), "parse"),
    "reply nested 200k deep": (("raw", NESTED.encode()), "parse"),
    "content nested 200k deep": (NESTED, "parse"),
    "200 with HTML": (("raw", b"<!doctype html><html><body>Bad gateway</body></html>"), "parse"),
    "not UTF-8": (("raw", b'{"choices": [{"message": {"content": "\xff\xfe\xfa"}}]}'), "parse"),
    "quote outside the response": ('{"quotes": ["3+4=8"]}', "parse"),
    "huge segment list": (json.dumps({"segments": [0] * 100_000}), "parse"),
    "segment id 10^22": ('{"segments": [10000000000000000000000]}', "parse"),
    # quadratic for a backtracking fence regex (minutes at this size): parsing must stay linear
    "fenced whitespace bomb": ("```" + " " * 300_000 + "x" + " " * 300_000 + "y```", "parse"),
    "reply over the cap (Content-Length)": (("raw", b" " * (CAP + 1)), "http"),
    "reply over the cap (no length)": (("wire", HEAD + b"Connection: close\r\n\r\n" + b" " * (CAP + 10)), "http"),
    "body shorter than Content-Length": (("wire", HEAD + b"Content-Length: 500\r\n\r\n" + GOOD[:40]), "http"),
    "chunked encoding cut off": (("wire", HEAD + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + GOOD[:16] + b"\r\n2"),
                                 "http"),
    "garbage status line": (("wire", b"SPAM 200 nope\r\n\r\n"), "http"),
    "closed without a reply": (("wire", b""), "http"),
    "HTTP 500": (("status", 500), "http"),
    "HTTP 401": (("status", 401), "http"),
    "slow drip of the body": (("drip", HEAD + f"Content-Length: {len(GOOD)}\r\n\r\n".encode(), GOOD, 0.2), "timeout"),
    "slow drip of the headers": (("drip", b"HTTP/1.1 200 OK\r\n", b"X-Pad: y\r\n" * 100, 0.05), "timeout"),
    "no reply within the timeout": (("sleep", 10.0), "timeout"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_every_bad_reply_is_a_counted_failure_within_the_deadline(server, caplog, name):
    behaviour, kind = FAULTS[name]
    s = server([behaviour])
    t0 = time.monotonic()
    out, failures = _api(s.url, timeout=1.0, deadline=1.5, retries=0)([JOB], [None])
    elapsed = time.monotonic() - t0
    assert out == [None] and failures == Counter({kind: 1}), failures
    assert elapsed < 1.5 + SLACK_S, elapsed
    (line,) = [r.getMessage() for r in caplog.records]  # one log line per kind
    assert f"1 of 1 jobs failed ({kind})" in line and KEY not in caplog.text


def test_redirects_are_not_followed_and_the_key_goes_nowhere_else(server, caplog):
    elsewhere = server(['{"segments": [1]}'] * 3)
    s = server([("status", 301, {"Location": elsewhere.url + "/chat/completions"})] * 2)
    out, failures = _api(s.url, retries=1)([JOB], [None])
    assert out == [None] and failures == Counter(http=1)
    assert len(s.requests) == 1 and elsewhere.requests == []  # not retried: a redirect will not change
    assert "redirect" in caplog.text and "not followed" in caplog.text


def test_a_client_error_is_not_retried_but_a_rate_limit_is(server):
    s = server([("status", 401), '{"segments": [1]}'])
    assert _api(s.url, retries=2)([JOB], [None])[1] == Counter(http=1) and len(s.requests) == 1
    s = server([("status", 429), '{"segments": [1]}'])
    out, failures = _api(s.url, retries=2)([JOB], [None])
    assert failures == Counter() and out[0].key_spans == [(6, 12)] and len(s.requests) == 2


def test_retries_and_backoff_stay_within_one_deadline_for_all_jobs(server):
    """Three jobs, one worker, a server that never answers in time, ten retries allowed: the call still
    ends by its deadline (one per call, shared by its jobs), every job a counted timeout."""
    s = server(default=lambda prompt: ("sleep", 10.0))
    t0 = time.monotonic()
    out, failures = _api(s.url, timeout=1.0, retries=10, deadline=2.5)([JOB] * 3, [None] * 3)
    elapsed = time.monotonic() - t0
    assert out == [None] * 3 and failures == Counter(timeout=3)
    assert elapsed < 2.5 + SLACK_S and len(s.requests) <= 3, (elapsed, len(s.requests))


def test_the_api_key_is_masked_in_the_log_even_if_the_server_echoes_it(server, caplog):
    s = server([f"cannot parse this, key {KEY}"])
    out, failures = _api(s.url, retries=0)([JOB], [None])
    assert failures == Counter(parse=1) and KEY not in caplog.text and "***" in caplog.text


def test_api_annotator_unreachable_endpoint_counts_failures(caplog):
    out, failures = _api("http://127.0.0.1:9", retries=0)([JOB, JOB], [None, None])
    assert out == [None, None] and failures == Counter(http=2)
    assert [r.getMessage()[:40] for r in caplog.records] == ["api annotator: 2 of 2 jobs failed (http)"[:40]]


def test_api_annotator_rejects_bad_settings():
    with pytest.raises(ValueError, match="api_base_url"):
        _api("file:///etc/passwd")
    with pytest.raises(ValueError, match="max_reply_bytes"):
        _api("http://127.0.0.1:9", max_reply_bytes=0)
    from trace_train.config import load_config

    for bad, match in (("trace.api_deadline_s=0", "api_deadline_s must be > 0"),
                       ("trace.api_max_reply_bytes=-1", "api_max_reply_bytes must be > 0"),
                       ("trace.api_retries=-1", "api_retries must be >= 0"),
                       ("trace.api_base_url=localhost:8000/v1", "must start with http:// or https://")):
        with pytest.raises(ValueError, match=match):
            load_config(None, [bad])


class _ScriptedEngine:
    """A 'policy' that answers the annotation prompts with scripted replies (as character tokens)."""

    def __init__(self, replies):
        self.replies = replies

    def generate(self, prompts, k, seeds):
        from trace_train.rollout import Rollouts

        return Rollouts(prompts, [list(r.encode()) for r in self.replies], [], [True] * len(self.replies))


class _ByteTok:
    def __call__(self, text):
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode()


def test_self_annotator_parses_its_own_generations():
    """The policy's generations go through the same strict parser: a scripted 'policy' answers twice."""
    ann = SelfAnnotator(ArithTask(), _ScriptedEngine(['{"segments": [0]}', "no idea"]), _ByteTok(), chat=lambda s: s)
    out, failures = ann([JOB, JOB], [None, None], seeds=[0, 1])
    assert out[0].key_spans == [(0, 6)] and out[1] is None and failures == Counter(parse=1)


def test_self_annotator_counts_any_exception_of_the_parser(monkeypatch, caplog):
    """A generation that sends the parser into a RecursionError, and a parser that raises something no one
    anticipated (a stand-in for a bug): both counted, the second as `other` with its class and place."""
    ann = SelfAnnotator(ArithTask(), _ScriptedEngine([NESTED, '{"segments": [0]}']), _ByteTok(), chat=lambda s: s)
    out, failures = ann([JOB, JOB], [None, None], seeds=[0, 1])
    assert out[0] is None and out[1].key_spans == [(0, 6)] and failures == Counter(parse=1)

    def broken(reply, *args):
        return {}["segments"]

    monkeypatch.setattr(annotate, "parse_annotation", broken)
    caplog.clear()
    out, failures = ann([JOB, JOB], [None, None], seeds=[0, 1])
    assert out == [None, None] and failures == Counter(other=2)
    assert "KeyError at test_annotate.py:" in caplog.text and len(caplog.records) == 1


def test_api_annotator_counts_an_unanticipated_exception_as_other(server, monkeypatch, caplog):
    monkeypatch.setattr(annotate, "reply_content", lambda body: body.decode().no_such_method())
    s = server(['{"segments": [1]}'])
    out, failures = _api(s.url, retries=0)([JOB], [None])
    assert out == [None] and failures == Counter(other=1) and "AttributeError" in caplog.text


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
        "train.max_new_tokens=12", "trace.annotator=api", f"trace.api_base_url={s.url}", "trace.api_model=m",
        "trace.api_retries=0",
        "trace.reverse_kl=true", "train.export_hf=false"])
    history = run(cfg)
    assert len(history) == 2
    assert sum(m["annotator_failures"] for m in history) > 0
    assert sum(m["annotated_rollouts"] for m in history) > 0 and any(m["span_fraction"] > 0 for m in history)
    assert all(m["annotated_rollouts"] + m["annotator_failures"] <= 8 for m in history)
    assert all(m["annotator_failures"] == m["annotator_failures/http"] for m in history)  # the oracle's 500s


def test_training_completes_through_a_server_that_fails_every_request(server, tmp_path, monkeypatch, caplog):
    """Every request fails, each in turn in one of the ways of FAULTS: the run completes its steps as GRPO,
    counts every job by kind, and warns loudly once all jobs failed on enough annotated steps in a row."""
    from trace_train import train
    from trace_train.config import load_config

    names, count, lock = list(FAULTS), [0], threading.Lock()

    def failing(prompt):
        with lock:
            n, count[0] = count[0], count[0] + 1
        return FAULTS[names[n % len(names)]][0]

    monkeypatch.setattr(train, "ALL_FAILED_WARN_STEPS", 2)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = server(default=failing)
    cfg = load_config("toy", [
        f"train.output_dir={tmp_path}", "train.max_steps=2", "train.prompts_per_step=2", "train.rollouts_per_prompt=8",
        "train.max_new_tokens=8", "trace.annotator=api", f"trace.api_base_url={s.url}", "trace.api_model=m",
        "trace.api_retries=0",
        "trace.api_timeout_s=1.0", "trace.api_deadline_s=1.5", "trace.reverse_kl=true", "train.export_hf=false"])
    history = train.run(cfg)
    assert [m["step"] for m in history] == [0, 1] and len(s.requests) == 32  # one request per job, no retries
    for m in history:
        assert m["annotator_failures"] == 16 and m["annotated_rollouts"] == 0
        assert m["span_fraction"] == 0 and m["teacher_rollouts"] == 0
        assert m["time_annotate_s"] < 1.5 + SLACK_S
    # every behaviour of FAULTS was served at least once, so the totals by kind are known
    expected = Counter(FAULTS[names[n % len(names)]][1] for n in range(32))
    assert {k: sum(m[f"annotator_failures/{k}"] for m in history) for k in annotate.FAILURE_KINDS} == {
        k: expected[k] for k in annotate.FAILURE_KINDS}
    assert [m["annotator_all_failed_streak"] for m in history] == [1, 2]
    loud = [r for r in caplog.records if "training as plain GRPO" in r.getMessage()]
    assert len(loud) == 1 and "step 1:" in loud[0].getMessage()
    assert s.requests[0][1] == f"Bearer {KEY}" and KEY not in caplog.text


def test_self_annotation_in_the_loop_counts_unparseable_replies(tmp_path):
    """trace.annotator=self through the real engine: an untrained policy cannot write the JSON, so every
    rollout's annotation fails, is counted as a parse failure, and the step still trains (GRPO on all tokens,
    no KL rows)."""
    from trace_train.config import load_config
    from trace_train.train import run

    cfg = load_config("toy", [
        f"train.output_dir={tmp_path}", "train.max_steps=1", "train.prompts_per_step=2", "train.rollouts_per_prompt=2",
        "train.max_new_tokens=8", "trace.annotator=self", "trace.reverse_kl=true", "train.export_hf=false"])
    (m,) = run(cfg)
    assert m["annotator_failures"] == 4 and m["annotator_failures/parse"] == 4 and m["annotated_rollouts"] == 0
    assert m["span_fraction"] == 0 and m["teacher_rollouts"] == 0 and m["grad_norm"] >= 0
