"""Two `TraceGRPOTrainer` steps under bf16 autocast (TRL's `bf16=True`, fp32 master weights: the LM head enters
trace_loss in fp32 and its GEMMs run in bf16), on a tiny Qwen3 built in-process, on CUDA, or on the CPU with
--dry-run. Prints one line per step (loss, lambda, KLs) and exits non-zero if a step fails or its loss is not
finite. Needs trl and datasets (benchmarks/gpu_check.sh installs them from .whl/ on the GPU image).

    python -m benchmarks.gpu_trl_check [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trace_train.annotate import Annotation
    from trace_train.config import ModelConfig
    from trace_train.integrations.trl import TraceGRPOConfig, TraceGRPOTrainer
    from trace_train.model import build_char_tokenizer, build_tiny_model

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_trl_check: no CUDA device (use --dry-run on the CPU)", file=sys.stderr)
        return 2
    out = args.out or tempfile.mkdtemp()
    tok = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(tiny_layers=1, tiny_hidden=64, tiny_heads=2), tok, seed=0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(f"{out}/tiny")
    tok.save_pretrained(f"{out}/tiny")

    prompts = ["2+3=", "7*6-1=", "9-4=", "1+1+1=", "8*2=", "5-7="]
    rows = {"prompt": prompts, "problem": prompts, "answer": ["5", "41", "5", "3", "16", "-2"]}

    def annotate(jobs, examples, seeds):  # the first three characters of every response
        return [Annotation(key_spans=[(0, 3)] if j.correct else [], error_spans=[] if j.correct else [(0, 3)],
                           diagnostic=None if j.correct else "wrong step") for j in jobs], {}

    def reward(completions, **kwargs):
        return [float(c[:1].isdigit()) for c in completions]

    config = TraceGRPOConfig(output_dir=f"{out}/run", use_cpu=args.dry_run, bf16=True, report_to="none",
                             per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
                             logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-3, max_steps=2,
                             trace_hold_steps=2, trace_reverse_kl=True)
    trainer = TraceGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(f"{out}/tiny", dtype=torch.float32),
                               reward_funcs=reward, args=config, train_dataset=Dataset.from_dict(rows),
                               processing_class=AutoTokenizer.from_pretrained(f"{out}/tiny"), annotator=annotate,
                               privileged_prompt=lambda row, diagnostic: row["prompt"] + "A" + row["answer"] + "=")
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for i, h in enumerate(logs):
        print(f"TraceGRPOTrainer step {i + 1}: loss {h['loss']:.4g}, lambda {h.get('trace/lambda')}, fkl "
              f"{h.get('trace/fkl')}, rkl {h.get('trace/rkl')}, device {trainer.model.device}", flush=True)
    ok = len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    print("TraceGRPOTrainer: 2 steps ok" if ok else f"TraceGRPOTrainer: FAILED ({len(logs)} steps logged)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
