"""TRACE through TRL on the CPU, in under a minute: a tiny Qwen3 learns the synthetic mod-10 arithmetic task
with `TraceGRPOTrainer` (a drop-in `trl.GRPOTrainer`) and a `TraceGRPOConfig`.

    python examples/trl_trace.py [--sft-steps 40] [--steps 6] [--out /tmp/trl_trace]

1. A short supervised warm start (trace_train.experiments.sft) so that some rollouts are correct.
2. TRL's GRPO loop, with the loss computed by trace_loss from hidden states: while lambda > 0 the exact
   rule annotator of the synthetic task marks key spans of correct rollouts (forward KL) and error spans
   of incorrect ones (reverse KL); the same model, shown the problem's reference solution and the
   diagnostic type, is the teacher on those spans.
Needs `pip install 'trace-kernels[train,trl]'`. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="")
    a = parser.parse_args(argv)

    from datasets import Dataset

    from trace_train.annotate import RuleAnnotator
    from trace_train.config import ModelConfig
    from trace_train.experiments.sft import sft
    from trace_train.integrations.trl import TraceGRPOConfig, TraceGRPOTrainer
    from trace_train.tasks import ArithTask, arith

    t0 = time.perf_counter()
    out = a.out or tempfile.mkdtemp(prefix="trl_trace_")
    model_dir = os.path.join(out, "sft")
    sft(ModelConfig(tiny_layers=2, tiny_hidden=64, tiny_heads=4), model_dir, steps=a.sft_steps, batch=16,
        max_ops=2, slip=0.2, log=lambda s: None)
    print(f"warm start: {a.sft_steps} SFT steps in {time.perf_counter() - t0:.1f} s")

    task = ArithTask(min_ops=1, max_ops=2)
    rng = random.Random(0)
    examples = [task.wrap(arith.sample_problem(rng, rng.randint(1, 2))) for _ in range(64)]
    dataset = Dataset.from_dict({"prompt": [task.student_text(ex) for ex in examples],
                                 "problem": [ex.problem for ex in examples], "index": list(range(len(examples)))})

    # TRL passes the dataset's columns to reward functions; the annotator and the privileged prompt get
    # the rows. The project's rule annotator takes the task's examples, hence the small adapters.
    def reward(completions, index, **kwargs):
        return [task.reward(c, examples[i]) for c, i in zip(completions, index)]

    rule = RuleAnnotator(task)

    def annotator(jobs, rows, seeds):
        return rule(jobs, [examples[r["index"]] for r in rows], seeds)

    def privileged_prompt(row, diagnostic):
        return task.teacher_text(examples[row["index"]], diagnostic)

    args = TraceGRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, report_to="none", max_steps=a.steps, logging_steps=1,
        save_strategy="no", seed=0, learning_rate=5e-4, per_device_train_batch_size=16, num_generations=8,
        max_completion_length=24, temperature=1.0, loss_type="grpo", epsilon_high=0.28,
        trace_w0=0.5, trace_hold_steps=a.steps // 2, trace_decay_steps=a.steps // 2, trace_reverse_kl=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = TraceGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                               processing_class=tok, annotator=annotator, privileged_prompt=privileged_prompt)
    trainer.train()
    print(f"{'step':>4} {'reward':>7} {'lambda':>7} {'spans':>6} {'fkl':>7} {'rkl':>7} {'entropy':>7}")
    for h in trainer.state.log_history:
        if "loss" in h:
            print(f"{h['step']:4d} {h['reward']:7.3f} {h['trace/lambda']:7.3f} {h['trace/span_fraction']:6.3f} "
                  f"{h['trace/fkl']:7.4f} {h['trace/rkl']:7.4f} {h['entropy']:7.3f}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
