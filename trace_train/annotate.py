"""Span annotators: key spans on correct rollouts, error spans (plus a coarse diagnostic type) on incorrect
ones, as character ranges of the response text.

- `rule`: the synthetic task's exact annotator (trace_train.tasks.arith).
- `api`: any OpenAI-compatible chat-completions endpoint (a stronger model, a local server).
- `self`: the policy itself answers the same annotation prompt (online self-annotation).

Every annotator is called as `annotator(jobs, examples, seeds) -> (annotations, failures)`: one
`Annotation` or None per job, and a Counter of failed jobs by kind (keys from FAILURE_KINDS).

The model-based annotators see the response cut into numbered segments and must answer with one JSON
object: {"segments": [ids], "quotes": ["exact text", ...], "diagnostic": "<one of the listed types>"}
(segments or quotes or both). Parsing is strict: an id out of range, more ids or quotes than the response
has segments, a quote not in the response, an unknown key or diagnostic all reject the reply.

Failure boundary. Each job has one: everything from sending its request (or decoding the policy's own
generation) to holding a validated `Annotation` runs inside it, and whatever goes wrong there, with any
exception class, leaves that rollout without spans and is counted by kind; it never stops training:

- `timeout`: an attempt ran past `timeout` seconds, or the call's `deadline` passed (one deadline for all
  the jobs of a call, that is of a step on a rank, retries and backoff included). Both are wall-clock bounds
  on the whole exchange, not socket timeouts: a watchdog shuts the socket down when time is up, so a server
  dripping one byte a second, into the headers or the body, cannot hold a step. Parsing a reply is linear
  in its size, which the cap bounds.
- `http`: connection refused or reset, an HTTP status other than 2xx, a body shorter than its
  Content-Length, chunked encoding cut off, a reply larger than `max_reply_bytes` (read at most that many
  bytes plus one), a redirect. Redirects are not followed: an OpenAI-compatible endpoint never redirects a
  POST, urllib would resend the Authorization header (the API key) to whatever host the redirect names and
  turn the POST into a GET; set the base URL to the final address instead.
- `parse`: the reply arrived but is not a valid annotation: not JSON (HTML, non-UTF-8, nested too deeply
  for the parser), no `choices[0].message.content`, a content that is not a string (null for a refusal or
  a tool call, a number, an object), or an annotation the strict rules above reject. These are exactly
  the `AnnotationError`s raised by `reply_content` and `parse_annotation`, which check every case they
  know of and raise nothing else for a bad reply.
- `other`: any other exception inside the boundary. By construction that is something the checks above
  did not anticipate, a bad reply of a new kind or a bug of ours; it is counted like the rest, and its
  log line names the exception class and the file and line that raised it, so it can be told apart from
  the reply-level kinds and fixed.

What propagates: only code outside the boundary, which runs on our own data or on a validated Annotation
(building the prompt, the policy's generation under FSDP, which is collective, and in the trainer the
mapping of validated character spans to tokens). An exception there is a programming error and stops the
run, as it should. KeyboardInterrupt and SystemExit are never caught.

Every call logs one warning line per failure kind that occurred (count and one example message), never
the API key: messages are built from the exception and the reply, and the key is masked in them in case a
server echoes it.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

FAILURE_KINDS = ("timeout", "http", "parse", "other")


@dataclass
class Annotation:
    """The spans of one response, as character ranges [start, end) of its text (the trainer maps them to
    tokens through the tokenizer's offsets)."""

    key_spans: list[tuple[int, int]]  # on a correct response: the decisive steps (the synthetic task: step results)
    error_spans: list[tuple[int, int]]  # on an incorrect one: the first wrong or malformed step
    diagnostic: str | None  # coarse type of the error (None when correct)


class AnnotationError(ValueError):
    """A reply that is not a valid annotation (failure kind `parse`)."""


def segments(text: str) -> list[tuple[int, int]]:
    """The response cut into numbered pieces: non-empty lines, and within a line at ',', ';' or '. '."""
    out = []
    for m in re.finditer(r"[^\n]+", text):
        start = m.start()
        for piece in re.finditer(r"[^,;]+[,;]?|[,;]", m.group(0)):
            s, e = start + piece.start(), start + piece.end()
            if text[s:e].strip():
                out.append((s, e))
    return out


def annotation_prompt(problem: str, response: str, correct: bool, diagnostics: tuple[str, ...]) -> str:
    segs = segments(response)
    listing = "\n".join(f"[{i}] {response[s:e]}" for i, (s, e) in enumerate(segs))
    if correct:
        ask = ("This solution is correct. Mark its key steps: the few segments that decide the answer. "
               'Answer with JSON only: {"segments": [ids], "quotes": ["exact text from the solution"]}.')
    else:
        kinds = "; ".join(f'"{d}"' for d in diagnostics)
        ask = ("This solution is incorrect. Mark the erroneous steps: where it first goes wrong. Answer with "
               'JSON only: {"segments": [ids], "quotes": ["exact text from the solution"], '
               f'"diagnostic": one of {kinds}}}.')
    return f"Problem:\n{problem}\n\nSolution, in numbered segments:\n{listing}\n\n{ask}"


def _unfence(text: str) -> str:
    """The inside of a ```json ... ``` fence, if the whole text is one. String operations, not a regex: the
    backtracking pattern used before took minutes on a fenced reply of two long runs of spaces."""
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        inner = text[3:-3]
        return (inner[4:] if inner.startswith("json") else inner).strip()
    return text


def parse_annotation(reply: str, response: str, correct: bool, diagnostics: tuple[str, ...]) -> Annotation:
    """Strictly read an annotator's reply into character spans of `response`. Raises AnnotationError for
    every bad reply it knows of (and nothing else for those); the spans of the result are checked to lie in
    `response`: 0 <= start < end <= len(response)."""
    if not isinstance(reply, str):
        raise AnnotationError(f"reply is {type(reply).__name__}, not a string")
    text = _unfence(reply.strip())
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise AnnotationError(f"not JSON ({type(e).__name__}): {reply[:80]!r}") from None
    if not isinstance(obj, dict):
        raise AnnotationError("not a JSON object")
    unknown = set(obj) - {"segments", "quotes", "diagnostic"}
    if unknown:
        raise AnnotationError(f"unknown keys {sorted(unknown)[:5]}")
    ids, quotes = obj.get("segments", []), obj.get("quotes", [])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise AnnotationError("segments must be a list of integers")
    if not isinstance(quotes, list) or not all(isinstance(q, str) and q for q in quotes):
        raise AnnotationError("quotes must be a list of non-empty strings")
    segs = segments(response)
    if len(ids) > len(segs) or len(quotes) > len(segs):
        raise AnnotationError(f"{len(ids)} segment ids and {len(quotes)} quotes for a response of {len(segs)} "
                              "segments (each at most once)")
    spans = []
    for i in ids:
        if not 0 <= i < len(segs):
            raise AnnotationError(f"segment {str(i)[:24]} out of range (0..{len(segs) - 1})")
        spans.append(segs[i])
    for q in quotes:
        at = response.find(q)
        if at < 0:
            raise AnnotationError(f"quote not found in the response: {q[:40]!r}")
        spans.append((at, at + len(q)))
    if not spans:
        raise AnnotationError("no spans")
    spans = sorted(set(spans))
    assert all(0 <= s < e <= len(response) for s, e in spans), "spans outside the response"  # our invariant
    diagnostic = obj.get("diagnostic")
    if correct:
        return Annotation(key_spans=spans, error_spans=[], diagnostic=None)
    if not isinstance(diagnostic, str) or diagnostic not in diagnostics:
        raise AnnotationError(f"diagnostic must be one of the listed types, got {str(diagnostic)[:60]!r}")
    return Annotation(key_spans=[], error_spans=spans, diagnostic=diagnostic)


def reply_content(body: bytes) -> str:
    """choices[0].message.content of a chat-completions reply; AnnotationError for anything else."""
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: not JSON, or not UTF-8 / 16 / 32
        raise AnnotationError(f"reply is not JSON ({type(e).__name__}): {body[:60]!r}") from None
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or not choices:
        raise AnnotationError("reply has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        raise AnnotationError(f"choices[0].message.content is {type(content).__name__}, not a string "
                              "(a refusal or a tool call?)")
    return content


@dataclass
class Job:
    problem: str
    response: str
    correct: bool


@dataclass
class Failure:
    """Why one job has no annotation; `retry`: whether another attempt may help."""

    kind: str
    message: str
    retry: bool = True


def _unexpected(e: BaseException) -> Failure:
    """An exception nothing anticipated: name its class and where it was raised (a bug of ours shows here)."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return Failure("other", f"{type(e).__name__}{where}: {str(e)[:200]}", retry=False)


def tally(results: list[Annotation | Failure], what: str = "annotator", secret: str = ""
          ) -> tuple[list[Annotation | None], Counter]:
    """Annotations (None for failed jobs) and the failures by kind; logs one line per kind, `secret` masked."""
    failures = Counter(r.kind for r in results if isinstance(r, Failure))
    for kind in FAILURE_KINDS:
        if failures[kind]:
            example = next(r.message for r in results if isinstance(r, Failure) and r.kind == kind)
            line = " ".join(f"{what}: {failures[kind]} of {len(results)} jobs failed ({kind}), e.g. {example}".split())
            log.warning(line.replace(secret, "***") if secret else line)
    return [None if isinstance(r, Failure) else r for r in results], failures


class RuleAnnotator:
    def __init__(self, task):
        if not task.has_rule_annotator:
            raise ValueError("trace.annotator=rule needs a task with exact spans (data.task=arith); use api or self")
        self.task = task

    def __call__(self, jobs: list[Job], examples, seeds=None) -> tuple[list[Annotation | None], Counter]:
        # exact and ours: an exception here is a bug and propagates
        return [self.task.annotate(j.response, ex) for j, ex in zip(jobs, examples)], Counter()


class _Watchdog:
    """Shuts a request's socket down when its time is up. A socket timeout bounds each wait for bytes, not
    their total: without this a server sending a byte a second would hold the request forever."""

    def __init__(self, seconds: float):
        self.fired, self._sock, self._lock = False, None, threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()

    def attach(self, sock) -> None:
        with self._lock:
            self._sock, fired = sock, self.fired
        if fired:
            self._shutdown(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired, sock = True, self._sock
        if sock is not None:
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock) -> None:
        try:  # shutdown, unlike close, wakes a thread blocked in recv on this socket
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _watched(base):
    class Watched(base):
        watchdog: _Watchdog

        def connect(self):
            super().connect()
            self.watchdog.attach(self.sock)

    return Watched


_HTTPConnection, _HTTPSConnection = _watched(http.client.HTTPConnection), _watched(http.client.HTTPSConnection)


def _factory(cls, watchdog):
    def make(host, **kw):
        conn = cls(host, **kw)
        conn.watchdog = watchdog
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog):
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req):
        return self.do_open(_factory(_HTTPConnection, self.watchdog), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog):
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req):
        return self.do_open(_factory(_HTTPSConnection, self.watchdog), req, context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError(3xx): see the module docstring


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, TimeoutError) or (isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError))


class ApiAnnotator:
    """POST {base_url}/chat/completions for each job, in parallel threads. Each call has one deadline,
    `deadline` seconds after it starts, for all its jobs; each attempt at most `timeout` seconds; `retries`
    further attempts with exponential backoff (0.5 s, 1 s, ... 8 s) while the deadline allows; replies over
    `max_reply_bytes` are refused. Proxies from the environment are used as urllib uses them."""

    def __init__(self, task, base_url: str, model: str, api_key: str = "", timeout: float = 60.0, retries: int = 2,
                 workers: int = 16, deadline: float = 180.0, max_reply_bytes: int = 1 << 20):
        if not base_url:
            raise ValueError("trace.api_base_url is required for trace.annotator=api")
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"trace.api_base_url must be an http:// or https:// URL, got {base_url!r}")
        for name, v in (("timeout", timeout), ("deadline", deadline), ("max_reply_bytes", max_reply_bytes)):
            if not v > 0:
                raise ValueError(f"ApiAnnotator: {name} must be > 0, got {v}")
        if retries < 0:
            raise ValueError(f"ApiAnnotator: retries must be >= 0, got {retries}")
        self.task, self.url, self.model, self.key = task, base_url.rstrip("/") + "/chat/completions", model, api_key
        self.timeout, self.retries, self.workers = timeout, retries, workers
        self.deadline, self.max_reply_bytes = deadline, max_reply_bytes

    def __call__(self, jobs: list[Job], examples, seeds=None) -> tuple[list[Annotation | None], Counter]:
        if not jobs:
            return [], Counter()
        deadline = time.monotonic() + self.deadline
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs)))) as pool:
            results = list(pool.map(lambda j: self._job(j, deadline), jobs))
        return tally(results, "api annotator", self.key)

    def _job(self, job: Job, deadline: float) -> Annotation | Failure:
        # outside the boundary: the request is built from our own data
        prompt = annotation_prompt(job.problem, job.response, job.correct, self.task.diagnostics)
        body = json.dumps({"model": self.model, "temperature": 0.0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        failure = Failure("timeout", "the deadline passed before the first attempt", retry=False)
        for attempt in range(self.retries + 1):
            if attempt:
                pause = min(0.5 * 2 ** (attempt - 1), 8.0)
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            out = self._attempt(body, job, deadline)
            if isinstance(out, Annotation):
                return out
            failure = out
            if not out.retry:
                break
        return failure

    def _attempt(self, body: bytes, job: Job, deadline: float) -> Annotation | Failure:
        """One request, inside the failure boundary: an Annotation or the Failure, never an exception."""
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return Failure("timeout", "job deadline passed", retry=False)
            raw = self._post(body, min(self.timeout, remaining))
            if isinstance(raw, Failure):
                return raw
            try:
                return parse_annotation(reply_content(raw), job.response, job.correct, self.task.diagnostics)
            except AnnotationError as e:
                return Failure("parse", str(e))
        except Exception as e:  # noqa: BLE001 -- the boundary: nothing a reply can cause escapes
            return _unexpected(e)

    def _post(self, body: bytes, seconds: float) -> bytes | Failure:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        cap = self.max_reply_bytes
        with _Watchdog(seconds) as watchdog:
            opener = urllib.request.build_opener(_NoRedirect, _HTTPHandler(watchdog), _HTTPSHandler(watchdog))
            try:
                with opener.open(req, timeout=seconds) as r:
                    declared = r.headers.get("Content-Length", "")
                    if declared.isdigit() and int(declared) > cap:
                        return Failure("http", f"reply of {declared} bytes is over the {cap}-byte cap", retry=False)
                    data = r.read(cap + 1)
            except urllib.error.HTTPError as e:
                e.close()
                if watchdog.fired:
                    return Failure("timeout", f"no complete reply within {seconds:.1f} s")
                if 300 <= e.code < 400:
                    return Failure("http", f"HTTP {e.code} redirect to {e.headers.get('Location', '')[:120]!r} "
                                   "not followed (set trace.api_base_url to the final URL)", retry=False)
                # 408 / 429 / 5xx may pass; other 4xx (a bad key, a bad model name) will not
                retry = e.code in (408, 429) or e.code >= 500
                return Failure("http", f"HTTP {e.code} {str(e.reason)[:80]} from {self.url}", retry=retry)
            except Exception as e:  # noqa: BLE001 -- classified below; nothing escapes the boundary
                if watchdog.fired or _is_timeout(e):
                    return Failure("timeout", f"no complete reply within {seconds:.1f} s ({type(e).__name__})")
                if isinstance(e, (OSError, http.client.HTTPException)):  # URLError is an OSError
                    return Failure("http", f"{type(e).__name__}: {str(e)[:160]}")
                return _unexpected(e)
        if watchdog.fired:
            return Failure("timeout", f"no complete reply within {seconds:.1f} s")
        if len(data) > cap:
            return Failure("http", f"reply over the {cap}-byte cap", retry=False)
        if declared.isdigit() and len(data) < int(declared):
            return Failure("http", f"body of {len(data)} bytes, shorter than its Content-Length {declared}")
        return data


class SelfAnnotator:
    """The policy annotates its own rollouts: one greedy-ish generation per job on the annotation prompt
    (through the rollout engine, so it works under FSDP), parsed like the API's replies. No retries. The
    generation is collective and ours, so it is outside the failure boundary; decoding and parsing each
    reply is inside it."""

    def __init__(self, task, engine, tokenizer, chat):
        self.task, self.engine, self.tokenizer, self.chat = task, engine, tokenizer, chat

    def __call__(self, jobs: list[Job], examples, seeds: list[int]) -> tuple[list[Annotation | None], Counter]:
        prompts = [self.tokenizer(self.chat(annotation_prompt(j.problem, j.response, j.correct,
                                                              self.task.diagnostics)))["input_ids"] for j in jobs]
        ro = self.engine.generate(prompts, 1, seeds)
        return tally([self._one(j, ids) for j, ids in zip(jobs, ro.responses)], "self annotator")

    def _one(self, job: Job, ids) -> Annotation | Failure:
        try:
            reply = self.tokenizer.decode(ids, skip_special_tokens=True)
            return parse_annotation(reply, job.response, job.correct, self.task.diagnostics)
        except AnnotationError as e:
            return Failure("parse", str(e))
        except Exception as e:  # noqa: BLE001 -- the boundary: nothing the policy writes stops training
            return _unexpected(e)
