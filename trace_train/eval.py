"""Score a policy as avg@k accuracy: k samples per problem, the mean reward over all of them.

    python -m trace_train.eval --model runs/x/hf --files test.jsonl [--k 4] [--out scores.json]
    python -m trace_train.eval --model runs/x/hf --arith-ops 4-6 --n 200     # the synthetic task

Sampling defaults are the paper's evaluation settings (temperature 0.6, top-p 0.95, top-k 20); the rollouts
come from the same engines as training (HF generate here; vLLM on CUDA when installed).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .config import ModelConfig
from .model import load_policy
from .policy import Policy
from .rollout import Sampling, make_engine
from .tasks import ArithTask, DataError, Example, MathTask, Task

PAPER_SAMPLING = Sampling(max_new_tokens=2048, temperature=0.6, top_k=20, top_p=0.95)


def evaluate(engine, tok, task: Task, examples: list[Example], k: int, seed: int = 0,
             prompts_per_batch: int = 64) -> dict:
    """avg@k accuracy, pass@k, mean response length and truncation rate over `examples`."""
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rewards, lengths, finished = [], [], []
    for b in range(0, len(examples), prompts_per_batch):
        chunk = examples[b:b + prompts_per_batch]
        prompts = [tok(task.student_text(ex), add_special_tokens=False)["input_ids"] for ex in chunk]
        ro = engine.generate(prompts, k, [seed * 1_000_003 + b * k + i for i in range(len(chunk) * k)])
        for i, resp in enumerate(ro.responses):
            rewards.append(task.reward(tok.decode(resp, skip_special_tokens=True), chunk[i // k]))
            lengths.append(len(resp))
            finished.append(ro.finished[i])
    r = torch.tensor(rewards).view(len(examples), k)
    return {"avg_at_k": r.mean().item(), "pass_at_k": (r.max(dim=1).values > 0).float().mean().item(),
            "k": k, "problems": len(examples), "response_length": sum(lengths) / len(lengths),
            "truncated": 1.0 - sum(finished) / len(finished)}


def load_for_eval(path: str, dtype: str = "float32"):
    model, tok = load_policy(ModelConfig(path=path, dtype=dtype))
    policy = Policy(model).to("cuda" if torch.cuda.is_available() else "cpu")
    return policy, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face folder (e.g. <output_dir>/hf)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", help="comma-separated .jsonl/.parquet with problem, solution, answer")
    src.add_argument("--arith-ops", help="the synthetic task with this many operations, e.g. 4-6")
    p.add_argument("--n", type=int, default=200, help="problems (synthetic task; files: at most this many)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=PAPER_SAMPLING.temperature)
    p.add_argument("--top-p", type=float, default=PAPER_SAMPLING.top_p)
    p.add_argument("--top-k", type=int, default=PAPER_SAMPLING.top_k)
    p.add_argument("--max-new-tokens", type=int, default=PAPER_SAMPLING.max_new_tokens)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--engine", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="write the scores here as JSON")
    a = p.parse_args(argv)
    if a.files:  # data errors before the model loads: one line, exit status 2
        try:
            task = MathTask(a.files)
        except DataError as e:
            print(f"data error: {e}", file=sys.stderr)
            return 2
    policy, tok = load_for_eval(a.model, a.dtype)
    sampling = Sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p)
    engine = make_engine(a.engine, policy, tok, sampling, synced=False, model_path=a.model)
    if a.files:
        task.tokenizer = tok  # for the chat template
        examples = task.items[:a.n]
    else:
        lo, _, hi = a.arith_ops.partition("-")
        task = ArithTask(int(lo), int(hi or lo))
        examples = task.examples(a.seed, 0, a.n)
    scores = evaluate(engine, tok, task, examples, a.k, a.seed)
    print(json.dumps(scores, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
