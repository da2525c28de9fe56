"""Span annotators: key spans on correct rollouts, error spans (plus a coarse diagnostic type) on incorrect
ones, as character ranges of the response text.

- `rule`: the synthetic task's exact annotator (trace_train.arith).
- `api`: any OpenAI-compatible chat-completions endpoint (a stronger model, a local server).
- `self`: the policy itself answers the same annotation prompt (online self-annotation).

The model-based annotators see the response cut into numbered segments and must answer with one JSON
object: {"segments": [ids], "quotes": ["exact text", ...], "diagnostic": "<one of the listed types>"}
(segments or quotes or both). Parsing is strict. Any failure (timeout, HTTP error, malformed output, an id
out of range, a quote not in the response, an unknown diagnostic) leaves that rollout without spans and is
counted; it never stops training.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .arith import Annotation


class AnnotationError(ValueError):
    pass


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


def parse_annotation(reply: str, response: str, correct: bool, diagnostics: tuple[str, ...]) -> Annotation:
    """Strictly read an annotator's reply into character spans of `response`; AnnotationError otherwise."""
    text = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"not JSON: {reply[:80]!r}") from e
    if not isinstance(obj, dict):
        raise AnnotationError("not a JSON object")
    unknown = set(obj) - {"segments", "quotes", "diagnostic"}
    if unknown:
        raise AnnotationError(f"unknown keys {sorted(unknown)}")
    ids, quotes = obj.get("segments", []), obj.get("quotes", [])
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise AnnotationError("segments must be a list of integers")
    if not isinstance(quotes, list) or not all(isinstance(q, str) and q for q in quotes):
        raise AnnotationError("quotes must be a list of non-empty strings")
    segs = segments(response)
    spans = []
    for i in ids:
        if not 0 <= i < len(segs):
            raise AnnotationError(f"segment {i} out of range (0..{len(segs) - 1})")
        spans.append(segs[i])
    for q in quotes:
        at = response.find(q)
        if at < 0:
            raise AnnotationError(f"quote not found in the response: {q[:40]!r}")
        spans.append((at, at + len(q)))
    if not spans:
        raise AnnotationError("no spans")
    diagnostic = obj.get("diagnostic")
    if correct:
        return Annotation(key_spans=sorted(spans), error_spans=[], diagnostic=None)
    if diagnostic not in diagnostics:
        raise AnnotationError(f"diagnostic must be one of the listed types, got {diagnostic!r}")
    return Annotation(key_spans=[], error_spans=sorted(spans), diagnostic=diagnostic)


@dataclass
class Job:
    problem: str
    response: str
    correct: bool


class RuleAnnotator:
    def __init__(self, task):
        if not task.has_rule_annotator:
            raise ValueError("trace.annotator=rule needs a task with exact spans (data.task=arith); use api or self")
        self.task = task

    def __call__(self, jobs: list[Job], examples, seeds=None) -> tuple[list[Annotation | None], int]:
        return [self.task.annotate(j.response, ex) for j, ex in zip(jobs, examples)], 0


class ApiAnnotator:
    """POST {base_url}/chat/completions for each job, in parallel threads; strict parsing, per-request
    timeout, `retries` further attempts with exponential backoff on HTTP / network / parse errors."""

    def __init__(self, task, base_url: str, model: str, api_key: str = "", timeout: float = 60.0, retries: int = 2,
                 workers: int = 16):
        if not base_url:
            raise ValueError("trace.api_base_url is required for trace.annotator=api")
        self.task, self.url, self.model, self.key = task, base_url.rstrip("/") + "/chat/completions", model, api_key
        self.timeout, self.retries, self.workers = timeout, retries, workers

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0.0,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            reply = json.loads(r.read())
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise AnnotationError("reply lacks choices[0].message.content") from e

    def _one(self, job: Job) -> Annotation | None:
        prompt = annotation_prompt(job.problem, job.response, job.correct, self.task.diagnostics)
        for attempt in range(self.retries + 1):
            try:
                return parse_annotation(self._ask(prompt), job.response, job.correct, self.task.diagnostics)
            except (AnnotationError, urllib.error.URLError, TimeoutError, OSError, ValueError):
                if attempt < self.retries:
                    time.sleep(min(0.5 * 2**attempt, 8.0))
        return None

    def __call__(self, jobs: list[Job], examples, seeds=None) -> tuple[list[Annotation | None], int]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs)))) as pool:
            out = list(pool.map(self._one, jobs))
        return out, sum(a is None for a in out)


class SelfAnnotator:
    """The policy annotates its own rollouts: one greedy-ish generation per job on the annotation prompt
    (through the rollout engine, so it works under FSDP), parsed like the API's replies. No retries."""

    def __init__(self, task, engine, tokenizer, chat):
        self.task, self.engine, self.tokenizer, self.chat = task, engine, tokenizer, chat

    def __call__(self, jobs: list[Job], examples, seeds: list[int]) -> tuple[list[Annotation | None], int]:
        prompts = [self.tokenizer(self.chat(annotation_prompt(j.problem, j.response, j.correct,
                                                              self.task.diagnostics)))["input_ids"] for j in jobs]
        ro = self.engine.generate(prompts, 1, seeds)
        out = []
        for j, ids in zip(jobs, ro.responses):
            try:
                reply = self.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(parse_annotation(reply, j.response, j.correct, self.task.diagnostics))
            except AnnotationError:
                out.append(None)
        return out, sum(a is None for a in out)
