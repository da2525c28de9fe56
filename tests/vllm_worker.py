"""The real-vLLM engine checks in a process of their own (one process, or a rank under torchrun): build the trainer's
policy from a saved model, start the vLLM engine through make_engine, and compare vLLM's log-probs of what it
sampled with the policy's recomputed ones (the trainer's no-grad forward, trace_train.step.batch_logprobs) at three
points: as loaded, after a weight push, and after a push with the tied-head refresh broken on purpose. Writes
<out>/rank<r>.json. Also saves the tiny test models (`save_model`). Run by tests/test_vllm_real.py.

    python tests/vllm_worker.py MODEL OUT [--threads 2] [--eval-sampling]
    torchrun --nproc_per_node=2 tests/vllm_worker.py MODEL OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PROMPTS = [[7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18], [19, 20]]  # ids of the character tokenizer
K = 2
TRAIN_SAMPLING = dict(max_new_tokens=16, temperature=0.7)  # what the trainer samples with: no top-k / top-p
EVAL_SAMPLING = dict(max_new_tokens=16, temperature=0.7, top_k=5, top_p=0.9)
NOISE = 0.05  # the weight change of each push: larger than the weights themselves (init std 0.02)


def save_model(path: str, tied: bool) -> None:
    """A tiny Qwen3 with the character tokenizer, float32, head_dim 32 (vLLM's CPU attention needs >= 32); untied:
    an LM head of its own, near the embedding but not equal to it."""
    from trace_train.config import ModelConfig
    from trace_train.model import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(tiny_layers=2, tiny_hidden=64, tiny_heads=2), tok, seed=1)
    if not tied:
        g = torch.Generator().manual_seed(2)
        emb = model.model.embed_tokens.weight.detach()
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(emb + 0.02 * torch.randn(emb.shape, generator=g))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def perturb(policy, seed: int) -> None:
    """Add the same seeded noise to every parameter on every world size (each rank adds its shard of it)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            noise = NOISE * torch.randn(p.shape, generator=g)
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                noise = distribute_tensor(noise, p.device_mesh, p.placements)
            p.add_(noise)


def compare(engine, policy, tok, prompts, seeds, temperature) -> dict:
    """Generate; the policy's log-probs of the sampled tokens (the trainer's no-grad path) against vLLM's."""
    from trace_train.step import batch_logprobs

    t0 = time.perf_counter()
    ro = engine.generate(prompts, K, seeds)
    seconds = time.perf_counter() - t0
    trainer = batch_logprobs(policy, tok.pad_token_id, ro.prompts, ro.responses, temperature=temperature)
    sampler = torch.cat(ro.logprobs)
    return {"responses": ro.responses, "sampler": sampler.tolist(), "trainer": trainer.tolist(),
            "max_abs": (trainer.double() - sampler.double()).abs().max().item(), "tokens": sampler.numel(),
            "seconds": seconds}


def eval_sampling_check(engine, model_path, prompts, seeds) -> dict:
    """vLLM with top-k / top-p against filter_logits on a plain Hugging Face forward of the saved model."""
    from transformers import AutoModelForCausalLM

    from trace_train.rollout.sampling import Sampling, filter_logits

    s = Sampling(**EVAL_SAMPLING)
    engine.sampling = s
    ro = engine.generate(prompts, K, seeds)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    worst = 0.0
    with torch.no_grad():
        for p, r, lp in zip(ro.prompts, ro.responses, ro.logprobs):
            logits = hf(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            ref = filter_logits(logits, s).gather(1, torch.tensor(r)[:, None])[:, 0]
            worst = max(worst, (ref.double() - lp.double()).abs().max().item())
    engine.sampling = Sampling(**TRAIN_SAMPLING)
    return {"max_abs": worst, "tokens": sum(len(r) for r in ro.responses)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=0, help="the trainer's torch threads before the engine starts")
    ap.add_argument("--eval-sampling", action="store_true", help="also check top-k / top-p against filter_logits")
    a = ap.parse_args()

    import trace_train.rollout.vllm as engine_module
    from trace_train.config import load_config
    from trace_train.dist import init_distributed, shutdown
    from trace_train.rollout import Sampling, make_engine
    from trace_train.train import build_policy

    if a.threads:
        torch.set_num_threads(a.threads)
    d = init_distributed()
    cfg = load_config("toy", [f"model.path={a.model}", "train.engine=vllm"])
    policy, tok = build_policy(cfg, d)
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    mempolicy = engine_module._get_mempolicy()
    t0 = time.perf_counter()
    engine = make_engine("vllm", policy, tok, Sampling(**TRAIN_SAMPLING), synced=d.world > 1, model_path=a.model,
                         vllm_options=dict(kv_cache_gib=0.25))
    result = {"engine_start_s": time.perf_counter() - t0, "threads_before": threads,
              "threads_after": torch.get_num_threads(), "engine_threads": engine.engine_threads,
              "set_num_threads_kept": torch.set_num_threads is set_threads,
              "mempolicy_before": None if mempolicy is None else mempolicy[0]}
    after = engine_module._get_mempolicy()
    result["mempolicy_after"] = None if after is None else after[0]
    torch.set_num_threads(threads + 1)  # the trainer can still set its thread count
    result["set_num_threads_works"] = torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)

    share = len(PROMPTS) // d.world
    prompts = PROMPTS[d.rank * share:(d.rank + 1) * share]
    first = d.rank * share * K

    def seeds(step):
        return [1000 * step + first + i for i in range(len(prompts) * K)]

    if a.eval_sampling:
        result["eval_sampling"] = eval_sampling_check(engine, a.model, prompts, seeds(9))
    t = TRAIN_SAMPLING["temperature"]
    result["loaded"] = compare(engine, policy, tok, prompts, seeds(0), t)
    perturb(policy, 1)
    result["pushed"] = compare(engine, policy, tok, prompts, seeds(1), t)
    perturb(policy, 2)
    refresh = engine_module.refresh_tied_heads
    engine_module.refresh_tied_heads = lambda model: None  # the push broken on purpose: a stale tied head
    try:
        result["stale_push"] = compare(engine, policy, tok, prompts, seeds(2), t)
    finally:
        engine_module.refresh_tied_heads = refresh
    engine.close()
    shutdown()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{d.rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
