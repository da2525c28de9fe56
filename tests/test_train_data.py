"""Data, rewards, sampling and micro-batching of the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from trace_train.config import LossConfig, ModelConfig  # noqa: E402
from trace_train.model import build_char_tokenizer, build_tiny_model, make_batch, response_hidden  # noqa: E402
from trace_train.policy import Policy  # noqa: E402
from trace_train.rollout import HFRollouts, Sampling, filter_logits  # noqa: E402
from trace_train.routing import route  # noqa: E402
from trace_train.step import batch_loss, pack  # noqa: E402
from trace_train.tasks import ArithTask, DataError, MathTask, arith, math_reward, read_examples  # noqa: E402

RECORDS = [{"problem": "What is 1/2 + 1/4?", "solution": "1/2 + 1/4 = 2/4 + 1/4 = 3/4.", "answer": "\\frac{3}{4}"},
           {"problem": "Compute 7 * 6.", "solution": "7 * 6 = 42.", "answer": "42", "source": "extra field"},
           {"problem": "Solve x + 3 = 5.", "solution": "x = 5 - 3 = 2.", "answer": "2"}]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_jsonl_and_parquet_read_the_same(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "a.parquet")
    a, b = read_examples(str(tmp_path / "a.jsonl")), read_examples(str(tmp_path / "a.parquet"))
    assert a == b and [e.answer for e in a] == ["\\frac{3}{4}", "42", "2"]


def test_bad_records_name_what_is_missing(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: field 'solution' is missing"):
        read_examples(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="data.train_files"):
        MathTask(str(tmp_path / "missing.jsonl"))


GOOD = json.dumps(RECORDS[0])


@pytest.mark.parametrize("lines,match", [
    ([GOOD, '{"problem": "p", "solution": "s", "answer": 1,}'], r"line 2: not valid JSON \(Expecting property name"),
    ([GOOD, "", GOOD[:-1]], r"line 3: not valid JSON"),  # blank lines count: the number is the editor's
    ([GOOD, '{"problem": "p", "answer": "1"}'], r"line 2: field 'solution' is missing or null"),
    ([GOOD, '{"problem": "p", "solution": null, "answer": "1"}'], r"line 2: field 'solution' is missing or null"),
    ([GOOD, '{"problem": ["p"], "solution": "s", "answer": "1"}'], r"line 2: field 'problem' must be a string or a "
                                                                    r"number, got list"),
    ([GOOD, GOOD, '["p", "s", "1"]'], r"line 3: expected an object with problem, solution, answer, got list"),
    ([GOOD, "[" * 100_000], r"line 2: not valid JSON \(nested too deeply\)"),
    ([], r"no records"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, lines, match):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{tmp_path}/train.jsonl: {match}") as e:
        read_examples(str(path))
    assert "\n" not in str(e.value)


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes((GOOD + "\n").encode() + '{"problem": "ça"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: line 2: not UTF-8"):
        read_examples(str(tmp_path / "latin1.jsonl"))


@pytest.mark.parametrize("text,match", [
    ("[\n" + GOOD + ",\n" + GOOD + "\n", r"line 4: not valid JSON"),  # the list is never closed
    ("[\n" + GOOD + ",\n  {'problem': 'p'}\n]", r"line 3: not valid JSON \(Expecting property name enclosed in "
                                                r"double quotes at column 4\)"),
    (json.dumps(RECORDS[0]), r"expected a JSON list of records, got dict"),
    (json.dumps([RECORDS[0], RECORDS[1], {"problem": "p", "solution": "s"}]), r"record 2 \(from 0\): field 'answer' is"
                                                                               r" missing"),
    (json.dumps([RECORDS[0], "just a string"]), r"record 1 \(from 0\): expected an object"),
])
def test_json_errors_name_the_file_and_line_or_record(tmp_path, text, match):
    (tmp_path / "train.json").write_text(text)
    with pytest.raises(DataError, match=rf"train.json: {match}"):
        read_examples(str(tmp_path / "train.json"))


def test_parquet_errors_name_the_file_and_row(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "1"}]), tmp_path / "nosolution.parquet")
    with pytest.raises(DataError, match=r"nosolution.parquet: no column \['solution'\]"):
        read_examples(str(tmp_path / "nosolution.parquet"))
    rows = [{"problem": "p", "solution": "s", "answer": "1"}, {"problem": "q", "solution": None, "answer": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=r"null.parquet: row 1 \(from 0\): field 'solution' is missing or null"):
        read_examples(str(tmp_path / "null.parquet"))
    rows = [{"problem": "p", "solution": "s", "answer": [1]}, {"problem": "q", "solution": "t", "answer": [2, 3]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lists.parquet")
    with pytest.raises(DataError, match=r"lists.parquet: row 0 \(from 0\): field .answer. must be a string or"):
        read_examples(str(tmp_path / "lists.parquet"))
    (tmp_path / "text.parquet").write_text(GOOD)
    with pytest.raises(DataError, match=r"text.parquet: cannot read as Parquet \(") as e:
        read_examples(str(tmp_path / "text.parquet"))
    assert "\n" not in str(e.value)


def test_eval_refuses_an_engine_it_cannot_run_before_loading_the_model(tmp_path, capsys):
    from trace_train.eval import main as eval_main
    from trace_train.rollout import vllm_missing

    if not vllm_missing(str(tmp_path)):
        pytest.skip("vLLM can run here")
    assert eval_main(["--model", str(tmp_path / "no-model"), "--arith-ops", "1-3", "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("--engine vllm: ") and "use --engine hf or auto" in err[0]
    with pytest.raises(SystemExit):  # argparse: exit status 2 with the choices
        eval_main(["--model", str(tmp_path), "--arith-ops", "1-3", "--engine", "sglang"])


def test_eval_reports_a_bad_data_file_before_loading_the_model(tmp_path, capsys):
    from trace_train.eval import main as eval_main

    (tmp_path / "bad.json").write_text(json.dumps([RECORDS[0], {"problem": "p", "solution": "s"}]))
    # the model folder does not exist: the data error comes first
    assert eval_main(["--model", str(tmp_path / "no-model"), "--files", str(tmp_path / "bad.json")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"data error: {tmp_path}/bad.json: record 1 (from 0): field 'answer' is missing or null (need problem, "
        "solution, answer)"]


def test_a_bad_data_file_exits_2_with_one_line_and_no_traceback(tmp_path):
    """`python -m trace_train` on a malformed JSONL file: exit status 2, one line on stderr naming the file
    and the line, like a config error."""
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + "\n" + GOOD + "\n{oops\n")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
    r = subprocess.run([sys.executable, "-m", "trace_train", "--config", "toy",
                        "data.task=math", f"data.train_files={bad}", f"train.output_dir={tmp_path / 'run'}",
                        "train.algorithm=grpo", "train.export_hf=false"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"data error: {bad}: line 3: not valid JSON (Expecting property name "
                                             "enclosed in double quotes at column 2)"]


def test_math_task_epochs_cover_every_record_once_and_are_seeded(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    task = MathTask(str(tmp_path / "a.jsonl"))
    epoch = task.examples(seed=1, step=0, n=3)
    assert sorted(e.problem for e in epoch) == sorted(r["problem"] for r in RECORDS)
    assert sorted(e.problem for e in task.examples(1, 1, 3)) == sorted(e.problem for e in epoch)  # next epoch
    assert [e.problem for e in task.examples(1, 0, 5)][3:] == [e.problem for e in task.examples(1, 1, 3)][:2]
    # a step's problems depend only on (seed, step): the data position of a resumed run
    assert MathTask(str(tmp_path / "a.jsonl")).examples(1, 5, 2) == task.examples(1, 5, 2)


def test_math_reward_uses_math_verify():
    assert math_reward("so the total is \\boxed{0.75}", "\\frac{3}{4}") == 1.0
    assert math_reward("The answer is \\boxed{42}.", "42") == 1.0
    assert math_reward("The answer is \\boxed{41}.", "42") == 0.0
    assert math_reward("I do not know", "42") == 0.0


def test_math_prompts_use_the_chat_template_and_keep_the_solution_from_the_student(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(RECORDS[0]))
    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    task = MathTask(str(tmp_path / "a.jsonl"), tok)
    ex = task.examples(0, 0, 1)[0]
    student, teacher = task.student_text(ex), task.teacher_text(ex, task.diagnostics[0])
    assert student.startswith("<user>What is 1/2") and student.endswith("<assistant>")
    assert ex.solution not in student and ex.solution in teacher and task.diagnostics[0] in teacher


def test_arith_task_reproducible_and_in_range():
    task = ArithTask(2, 4)
    a, b = task.examples(3, 7, 16), task.examples(3, 7, 16)
    assert a == b and all(2 <= len(e.source.ops) <= 4 for e in a)
    assert task.reward(a[0].solution, a[0]) == 1.0
    with pytest.raises(ValueError, match="data.min_ops"):
        ArithTask(3, 2)
    pooled = ArithTask(1, 3, pool=4)
    drawn = {e.problem for st in range(20) for e in pooled.examples(0, st, 8)}
    assert drawn == {e.problem for e in pooled.pool} and len(pooled.pool) == 4


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    full = filter_logits(logits, Sampling(temperature=1.0))
    assert torch.allclose(full.exp(), torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)
    k2 = filter_logits(logits, Sampling(top_k=2)).exp()
    assert torch.allclose(k2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    p = filter_logits(logits, Sampling(top_p=0.8)).exp()  # 0.5 + 0.3 reaches 0.8: the third is dropped
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    p = filter_logits(logits, Sampling(top_p=0.81)).exp()
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    t = filter_logits(logits, Sampling(temperature=0.5)).exp()
    assert torch.allclose(t, torch.softmax(logits / 0.5, -1), atol=1e-6)


def test_rollouts_are_seeded_per_rollout_and_report_the_sampling_logprobs(tok):
    policy = Policy(build_tiny_model(ModelConfig(), tok, seed=1))
    engine = HFRollouts(policy, tok, Sampling(max_new_tokens=10, temperature=0.7))
    prompts = [tok("Q:1+2\nA:")["input_ids"], tok("Q:3*4-5\nA:")["input_ids"]]
    both = engine.generate(prompts, 3, seeds=[10, 11, 12, 20, 21, 22])
    alone = engine.generate(prompts[1:], 2, seeds=[21, 20])
    # what a rollout samples depends on its seed only, not on its batch-mates or position
    assert alone.responses == [both.responses[4], both.responses[3]]
    assert both.prompts[3] == prompts[1] and len(both.responses) == 6
    for r, lp, fin in zip(both.responses, both.logprobs, both.finished):
        assert len(r) == lp.numel() and (r[-1] == tok.eos_token_id) == fin
    # the reported log-probs are the model's at the sampling temperature
    batch = make_batch(both.prompts, both.responses, tok.pad_token_id)
    with torch.no_grad():
        logits = response_hidden(policy.lm, batch) @ policy.lm_head_weight().T
    ref = torch.log_softmax(logits / 0.7, -1).gather(1, batch.targets[:, None]).squeeze(1)
    assert torch.allclose(torch.cat(both.logprobs), ref, atol=1e-4)
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(prompts, 3, seeds=[1])


def test_seeded_sampler_draws_from_the_model_distribution(tok):
    """Gumbel-max with per-rollout generators samples the softmax: first-token frequencies over 4000
    rollouts match the model's probabilities within 4 binomial standard deviations."""
    policy = Policy(build_tiny_model(ModelConfig(), tok, seed=2))
    engine = HFRollouts(policy, tok, Sampling(max_new_tokens=1, temperature=1.0))
    prompt = tok("Q:5\nA:")["input_ids"]
    n = 4000
    ro = engine.generate([prompt], n, seeds=list(range(n)))
    counts = torch.bincount(torch.tensor([r[0] for r in ro.responses]), minlength=len(tok)).double()
    with torch.no_grad():
        probs = torch.softmax(policy.lm(torch.tensor([prompt])).logits[0, -1].double(), -1)
    sd = torch.sqrt(n * probs * (1 - probs))
    assert ((counts - n * probs).abs() <= 4 * sd + 1).all()


def test_pack_by_token_budget():
    assert pack([5, 5, 5, 5], 10) == [[0, 1], [2, 3]]
    assert pack([5, 12, 3, 3], 10) == [[0], [1], [2, 3]]  # a longer sequence gets a group of its own
    assert pack([5, 5], 0) == [[0, 1]] and pack([], 10) == []


def test_micro_batches_accumulate_to_the_full_batch_gradient(tok):
    """The global normalisers make the micro-batch losses sum to the one-batch loss: same gradients."""
    model = build_tiny_model(ModelConfig(), tok, seed=4).double()
    policy = Policy(model)
    problems = [arith.sample_problem(__import__("random").Random(i), 2) for i in range(4)]
    texts = [p.solution for p in problems[:2]] + ["1+1=3;3", "9"]
    responses = [tok(x)["input_ids"] + [tok.eos_token_id] for x in texts]
    prompts = [tok(arith.student_prompt(p))["input_ids"] for p in problems]
    teacher_prompts = [tok(arith.teacher_prompt(p, None))["input_ids"] for p in problems]
    lens, correct = [len(r) for r in responses], [True, True, False, False]
    key = [[(0, 2)], [(1, 3)], [], []]
    err = [[], [], [(0, 2)], [(0, 1)]]
    adv = torch.tensor([1.0, 0.5, -0.5, -1.0])
    cfg = LossConfig()

    def loss_of(idx):
        r = route([lens[i] for i in idx], [correct[i] for i in idx], [key[i] for i in idx], [err[i] for i in idx],
                  algorithm="trace", lam=0.3, reverse_kl=True, global_responses=4, global_tokens=sum(lens))
        return batch_loss(policy, tok.pad_token_id, [prompts[i] for i in idx], [responses[i] for i in idx], adv[idx],
                          r, cfg, teacher_prompts=[teacher_prompts[i] for i in idx], impl="torch").loss

    full = torch.autograd.grad(loss_of([0, 1, 2, 3]), list(model.parameters()))
    parts = [torch.autograd.grad(loss_of(g), list(model.parameters())) for g in pack([9, 9, 9, 9], 18)]
    for i, g in enumerate(full):
        assert torch.allclose(sum(p[i] for p in parts), g, rtol=1e-9, atol=1e-12)
    assert math.isfinite(loss_of([0]).item())


def reference_filter(logits_V: torch.Tensor, s: Sampling) -> torch.Tensor:
    """vLLM's sampling distribution of one row, by its definition, fp64: temperature; top-k keeps the tokens whose
    logit is at least the k-th largest; top-p on the top-k distribution renormalized keeps the most likely tokens
    until their mass reaches top_p (the token that crosses it included)."""
    z = logits_V.double() / s.temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < s.top_k < z.numel():
        keep &= z >= torch.sort(z, descending=True).values[s.top_k - 1]
    if s.top_p < 1:
        p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        mass = 0.0
        for i in torch.argsort(p, descending=True).tolist():
            if mass >= s.top_p:
                keep[i] = False
            mass += p[i].item()
    return torch.log_softmax(z.masked_fill(~keep, float("-inf")), -1)


def test_filter_logits_renormalizes_top_k_before_top_p():
    """vLLM's order: top-p is taken on the renormalized top-k distribution. Top-2 of (0.5, 0.3, 0.15, 0.05) is
    (0.625, 0.375): top-p 0.6 keeps the first token only (the mass before the second is 0.625); without the
    renormalization (0.5 before it) the second would stay."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = filter_logits(logits, Sampling(top_k=2, top_p=0.6)).exp()
    assert torch.allclose(p, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-6)
    p = filter_logits(logits, Sampling(top_k=3, top_p=0.9)).exp()  # top-3 renormalized: 0.5/0.95 + 0.3/0.95 < 0.9
    assert torch.allclose(p, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)


def test_filter_logits_against_the_reference():
    """Random rows (with ties at the top-k boundary), eval's and the demo's settings among others; the filtered
    support equal, the log-probs to 1e-5 (fp32 against fp64); in the rows with ties, which of two tied tokens
    top-p drops is the sort's choice (vLLM's too): there the sorted log-probs are compared. Rows whose cumulative
    mass falls within 1e-5 of top_p are skipped: there the fp32 and fp64 sums may decide the boundary token
    differently."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 61, generator=g) * 2.5
    logits[:20, 1:4] = logits[:20, :1]
    for t, k, p in ((1.0, 5, 0.9), (0.6, 20, 0.95), (0.7, 0, 0.8), (1.0, 10, 1.0), (0.5, 60, 0.3), (1.0, 1, 0.5)):
        s = Sampling(temperature=t, top_k=k, top_p=p)
        ours = filter_logits(logits, s)
        checked = 0
        for row in range(logits.shape[0]):
            ref = reference_filter(logits[row], s)
            z = ref.exp().sort(descending=True).values.cumsum(0)
            if p < 1 and (z - p).abs().min() < 1e-5:
                continue
            checked += 1
            a, b = (ours[row].sort().values, ref.sort().values) if row < 20 else (ours[row], ref)
            assert torch.equal(torch.isinf(a), torch.isinf(b)), (t, k, p, row)
            fin = torch.isfinite(b)
            assert torch.allclose(a[fin].double(), b[fin], atol=1e-5), (t, k, p, row)
        assert checked > 150
