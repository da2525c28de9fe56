"""vLLM rollouts colocated with the FSDP trainer on each GPU (the "colocate" pattern of TRL's GRPO trainer): one
vLLM engine per rank (`distributed_executor_backend="external_launcher"`, tensor parallel 1, the engine in the
trainer's process), asleep during training, woken for rollouts with the policy's current weights pushed in.

Imported only when vLLM is installed and CUDA is available (`trace_train.rollout.make_engine`). Written against
the vLLM >= 0.10.2 offline `LLM` API (V1 engine) as documented and as TRL 1.16 drives it; tested here against an
in-process fake of that interface (tests/test_vllm_engine.py), NOT yet run against vLLM itself:

- log-probs: `logprobs_mode="processed_logprobs"`, the sampled token's log-prob after temperature / top-k /
  top-p, which is what the HF engine returns and what the loss's importance ratio needs (vLLM's default is
  the raw model distribution), with `logprobs=0` (the sampled token only).
- memory: sleep level 2 between rollouts (weights and KV cache discarded: the weights are pushed anew before
  every generation anyway, so level 1's CPU backup would be wasted); `wake_up(tags=["weights"])`, push,
  `wake_up(tags=["kv_cache"])`, generate, `sleep(level=2)` (waking the weights alone first keeps the KV cache
  from being allocated while the gathered weights are in flight).
- weights: each FSDP shard cast to the compute dtype on its own rank, then all-gathered (half the traffic of
  fp32 masters in bf16), and loaded in buckets of about `bucket_bytes` through the worker model's
  `load_weights` (vLLM maps Hugging Face names such as q/k/v_proj onto its fused layers), then the prefix cache
  is reset (its entries were computed by the old weights).
- sampling: one SamplingParams per rollout with its own `seed`, so what a rollout samples depends on its seed
  only, as with the HF engine (the two engines draw different tokens for the same seed).
"""

from __future__ import annotations

import torch
from vllm import LLM, SamplingParams

from .sampling import Rollouts, Sampling

SLEEP_LEVEL = 2


class VLLMRollouts:
    def __init__(self, policy, tokenizer, sampling: Sampling, model_path: str, dtype: str | None = None,
                 gpu_memory_utilization: float = 0.35, max_model_len: int | None = None,
                 bucket_bytes: int = 1 << 29):
        """policy: trace_train.policy.Policy (FSDP-sharded or not); dtype: the engine's weights, the trainer's
        compute dtype (default: the policy's parameter dtype); bucket_bytes: weights loaded per call (512 MiB)."""
        if not model_path:
            raise ValueError("model.path: the vLLM engine loads the model from a local folder")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.policy, self.tokenizer, self.sampling = policy, tokenizer, sampling
        self.dtype = getattr(torch, dtype) if dtype else next(policy.parameters()).dtype
        self.bucket_bytes = bucket_bytes
        self.llm = LLM(model=model_path, distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                       gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                       max_model_len=max_model_len, dtype=str(self.dtype).removeprefix("torch."),
                       enable_prefix_caching=True, logprobs_mode="processed_logprobs")
        self.llm.sleep(level=SLEEP_LEVEL)

    def _engine_model(self):
        """The engine's model: with external_launcher the V1 worker runs in this process."""
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def named_weights(self):
        """(name, full tensor in the compute dtype) of every parameter; under FSDP every rank gathers every
        parameter in the same order (a collective per parameter)."""
        for name, p in self.policy.lm.named_parameters():
            p = p.detach().to(self.dtype)  # cast the local shard first: the gather moves compute-dtype bytes
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p)

    def push_weights(self) -> None:
        """The policy's current weights into the (woken) engine, bucket by bucket."""
        model = self._engine_model()
        bucket, size = [], 0
        for name, w in self.named_weights():
            bucket.append((name, w))
            size += w.numel() * w.element_size()
            if size >= self.bucket_bytes:
                model.load_weights(bucket)
                bucket, size = [], 0
        if bucket:
            model.load_weights(bucket)
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, seeds: list[int]) -> Rollouts:
        if len(seeds) != len(prompts) * k:
            raise ValueError(f"seeds: one per rollout ({len(prompts) * k}), got {len(seeds)}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the training step's cached blocks, before vLLM maps its pool back
        self.llm.wake_up(tags=["weights"])
        try:
            self.push_weights()
            self.llm.wake_up(tags=["kv_cache"])
            s = self.sampling
            flat = [p for p in prompts for _ in range(k)]
            params = [SamplingParams(n=1, seed=int(seed), temperature=s.temperature, top_k=s.top_k or -1,
                                     top_p=s.top_p, max_tokens=s.max_new_tokens, logprobs=0) for seed in seeds]
            outs = self.llm.generate([{"prompt_token_ids": p} for p in flat], params, use_tqdm=False)
        finally:
            self.llm.sleep(level=SLEEP_LEVEL)
        responses, logprobs, finished = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            # logprobs=0: each position's dict holds the sampled token (processed: after temperature, top-k/p)
            logprobs.append(torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs or [], ids)], dtype=torch.float32))
            finished.append(c.finish_reason == "stop")
        return Rollouts(flat, responses, logprobs, finished)
