"""vLLM rollouts colocated with the FSDP trainer on each GPU (TRL's "colocate" pattern): one vLLM engine per
rank (`external_launcher`, tensor parallel 1), asleep during training, woken for rollouts, with the policy's
current weights pushed into it before each generation.

Imported only when vLLM is installed (`make_engine`); never on the CPU. Written against the vLLM >= 0.10
`LLM` API (enable_sleep_mode, sleep/wake_up, per-request seeds, `logprobs=0` for the sampled token) and
NOT yet run by this project: no GPU session had vLLM installed. Per-request seeds keep the HF engine's
contract (what a rollout samples depends on its seed only) within vLLM's own sampler.
"""

from __future__ import annotations

import torch
from vllm import LLM, SamplingParams

from .rollout import Rollouts, Sampling


class VLLMRollouts:
    def __init__(self, policy, tokenizer, sampling: Sampling, model_path: str, gpu_memory_utilization: float = 0.35,
                 max_model_len: int | None = None):
        if not model_path:
            raise ValueError("model.path: the vLLM engine loads the model from a local folder")
        self.policy, self.tokenizer, self.sampling = policy, tokenizer, sampling
        self.llm = LLM(model=model_path, distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                       gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True,
                       max_model_len=max_model_len, dtype="bfloat16", enable_prefix_caching=True)
        self.llm.sleep(level=1)

    def _push_weights(self) -> None:
        """Full (gathered) parameters of the FSDP policy, one at a time, into the engine's model."""
        model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
        for name, p in self.policy.lm.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            model.load_weights([(name, full.detach().to(torch.bfloat16))])
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, seeds: list[int]) -> Rollouts:
        if len(seeds) != len(prompts) * k:
            raise ValueError(f"seeds: one per rollout ({len(prompts) * k}), got {len(seeds)}")
        self.llm.wake_up()
        try:
            self._push_weights()
            s = self.sampling
            flat = [p for p in prompts for _ in range(k)]
            params = [SamplingParams(n=1, seed=int(seed), temperature=s.temperature, top_k=s.top_k or -1,
                                     top_p=s.top_p, max_tokens=s.max_new_tokens, logprobs=0) for seed in seeds]
            outs = self.llm.generate([{"prompt_token_ids": p} for p in flat], params, use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        responses, logprobs, finished = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            logprobs.append(torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs or [], ids)]))
            finished.append(c.finish_reason == "stop")
        return Rollouts(flat, responses, logprobs, finished)
