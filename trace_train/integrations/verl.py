"""verl integration: import this module in verl's processes (`actor_rollout_ref.model.external_lib`, or
`VERL_USE_EXTERNAL_MODULES`) and verl's fused LM-head path runs on trace_kernels.

What importing it does, in the importing process (idempotent; `uninstall()` restores verl's objects):

- `verl.utils.experimental.torch_functional.FusedLinearForPPO` becomes `FusedLinearForPPO` below: verl's
  constructor (`chunk_size=512, impl_backend="torch" | "liger"`) and `forward(hidden_states, vocab_weights,
  input_ids, temperature=1.0)` -> (log-probs fp32, entropy in the logits' dtype), both shaped like input_ids.
  verl's dense and VL forwards (`verl/models/transformers/*.py`, impl_backend "torch" and "liger") look the
  class up at call time, so they get this one.
- `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy` becomes `linear_cross_entropy` below: verl's
  `(hidden, weight, labels, temperature, reduction="none", dist_process_group=None)` -> (log-probs fp32 [N]
  flat, or their sum / mean for reduction "sum" / "mean"; entropy fp32 [N]) (impl_backend "triton"). A
  vocabulary-parallel head (a `dist_process_group` of more than one rank, verl's Megatron engine under tensor
  parallelism) is refused: trace_kernels needs the whole vocabulary on one rank.
- `verl.models.transformers.dense_common.forward_with_torch_backend` / `forward_with_triton_backend` (the
  forwards verl's monkey patch `patch_forward_with_backends` installs for text models with
  `use_fused_kernels=True`) are wrapped: in a process where a `TraceVerlLoss` was built (the actor worker
  that `set_loss_fn` sent it to), a training forward with gradients hands the final hidden states, the LM-head
  weight and the rolled labels to that loss instead of computing log-probs (the loss computes GRPO and the
  span KLs from them in one `trace_loss` call), and the loss runs the teacher forward (privileged prompt plus
  the same response, no gradient) through the same model. Every other forward is verl's, on the kernels above.

The loss (`TraceVerlLoss`) is in `verl_loss.py`, the batch fields the trainer adds (`trace_batch_fields`,
`TraceTrainerMixin`) in `verl_batch.py`; docs/verl.md is the recipe.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.distributed as dist
from verl.models.transformers import dense_common as _dense
from verl.utils.experimental import torch_functional as _torch_functional
from verl.utils.kernel import linear_cross_entropy as _lce

import trace_kernels as tk

from .verl_handoff import Handoff, State

# Modules that bind `linear_cross_entropy` by name at import (verl's Megatron forwards): re-pointed when loaded.
_LCE_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")
_ORIGINALS: dict[str, object] = {}


def _logits_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype verl's own `hidden @ weight.T` would have here (autocast's when it is on)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _fused(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, targets_N: torch.Tensor, temperature) -> tuple:
    """Differentiable (log p [N] fp32, entropy [N] fp32) by trace_kernels; the head in hidden's dtype (the cast is
    differentiable, so an fp32 master weight gets its gradient) and autocast off (trace_kernels picks its own
    GEMM precision: fp32 accumulation of the inputs' dtype)."""
    with torch.autocast(device_type=hidden_NH.device.type, enabled=False):
        weight = weight_VH if weight_VH.dtype == hidden_NH.dtype else weight_VH.to(hidden_NH.dtype)
        return tk.logprobs_entropy(hidden_NH, weight, targets_N.to(torch.int64), float(temperature))


class FusedLinearForPPO(torch.nn.Module):
    """verl's `FusedLinearForPPO` on trace_kernels (same constructor, forward, shapes and output dtypes).

    Differences, both in what verl does not define: rows whose label is -100 give log-prob and entropy 0 (verl's
    liger backend does the same; its torch backend raises on them), and the logits are accumulated in fp32 from
    the inputs' dtype even under autocast (verl's torch backend rounds them to the autocast dtype first)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"Unsupported FusedLinearForPPO backend: {impl_backend}. Choose 'torch' or 'liger'.")
        self.chunk_size = chunk_size  # kept for verl's callers; trace_kernels plans its own chunks
        self.impl_backend = impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden_states.ndim not in (2, 3):
            raise ValueError(f"hidden_states must be 2D or 3D, got shape {tuple(hidden_states.shape)}")
        if input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(f"input_ids shape {tuple(input_ids.shape)} must match hidden_states shape "
                             f"{tuple(hidden_states.shape[:-1])}")
        shape = input_ids.shape
        out_dtype = _logits_dtype(hidden_states, vocab_weights)
        logp_N, entropy_N = _fused(hidden_states.reshape(-1, hidden_states.shape[-1]), vocab_weights,
                                   input_ids.reshape(-1), temperature)
        return logp_N.view(shape), entropy_N.to(out_dtype).view(shape)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0, reduction: str = "none",
                         dist_process_group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's `linear_cross_entropy` (its Triton kernel's interface) on trace_kernels: log-probs fp32 [N] (N =
    hidden's rows, flattened whatever hidden's shape), their sum or mean for reduction "sum" / "mean", and
    entropy fp32 [N]. Unlike verl's kernel it runs on any device, any hidden size (verl's needs a multiple of
    128) and gives 0 on label -100. A `dist_process_group` of more than one rank means a vocabulary-sharded
    (tensor-parallel) head, which is refused."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, but got {type(temperature)}")
    if not isinstance(reduction, str) or reduction.lower() not in ("none", "sum", "mean"):
        raise ValueError(f"Invalid reduction: {reduction}")
    if dist_process_group is not None and dist.is_initialized() and dist.get_world_size(dist_process_group) > 1:
        raise ValueError("linear_cross_entropy: dist_process_group has more than one rank, i.e. a vocabulary-"
                         "parallel (tensor-parallel) LM head; trace_kernels needs the whole head on each rank "
                         "(use verl's FSDP engine, or tensor_model_parallel_size=1 with Megatron)")
    logp_N, entropy_N = _fused(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), temperature)
    reduction = reduction.lower()
    if reduction == "sum":
        logp_N = logp_N.sum()
    elif reduction == "mean":
        logp_N = logp_N.sum() / labels.numel()
    return logp_N, entropy_N


_BASE_KEYS = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache",
              "output_attentions", "output_hidden_states", "cache_position")


def _wrap_forward(original, flat_log_probs: bool):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        teacher = State.teacher_pass
        if not teacher and not (State.armed and torch.is_grad_enabled() and self.training):
            return original(self, *args, **kwargs)
        if args:
            raise TypeError("verl's fused forward takes keyword arguments only")
        outputs = _dense.forward_base_model(self, **{k: kwargs[k] for k in _BASE_KEYS if k in kwargs})
        hidden = outputs[0]
        if teacher:
            State.teacher_hidden = hidden
            return _dense.CausalLMOutputForPPO()
        if kwargs.get("shift_labels") is not None:  # as verl's forwards choose the labels
            labels = kwargs["shift_labels"]
        elif kwargs.get("labels") is not None:
            labels = torch.roll(kwargs["labels"], shifts=-1, dims=-1)
        else:
            labels = torch.roll(kwargs["input_ids"], shifts=-1, dims=-1)
        State.handoff = Handoff(model=self, hidden=hidden, weight=self.lm_head.weight, labels=labels,
                                 temperature=float(kwargs.get("temperature", 1.0)),
                                 packed=kwargs.get("attention_mask") is None)
        # Placeholders of verl's shapes: the engine wraps them into its model_output, which the TRACE loss ignores.
        shape = (labels.numel(),) if flat_log_probs else labels.shape
        placeholder = torch.zeros(shape, dtype=torch.float32, device=hidden.device)
        return _dense.CausalLMOutputForPPO(log_probs=placeholder, entropy=placeholder,
                                           past_key_values=outputs.past_key_values)

    forward.trace_original = original
    return forward


def install() -> None:
    if _ORIGINALS:
        return
    _ORIGINALS.update(FusedLinearForPPO=_torch_functional.FusedLinearForPPO,
                      linear_cross_entropy=_lce.linear_cross_entropy,
                      forward_with_torch_backend=_dense.forward_with_torch_backend,
                      forward_with_triton_backend=_dense.forward_with_triton_backend)
    _torch_functional.FusedLinearForPPO = FusedLinearForPPO
    _lce.linear_cross_entropy = linear_cross_entropy
    for name in _LCE_IMPORTERS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "linear_cross_entropy"):
            _ORIGINALS[name] = module.linear_cross_entropy
            module.linear_cross_entropy = linear_cross_entropy
    _dense.forward_with_torch_backend = _wrap_forward(_ORIGINALS["forward_with_torch_backend"], False)
    _dense.forward_with_triton_backend = _wrap_forward(_ORIGINALS["forward_with_triton_backend"], True)


def uninstall() -> None:
    """verl's own objects back (models already patched keep the forward they were given)."""
    if not _ORIGINALS:
        return
    _torch_functional.FusedLinearForPPO = _ORIGINALS.pop("FusedLinearForPPO")
    _lce.linear_cross_entropy = _ORIGINALS.pop("linear_cross_entropy")
    _dense.forward_with_torch_backend = _ORIGINALS.pop("forward_with_torch_backend")
    _dense.forward_with_triton_backend = _ORIGINALS.pop("forward_with_triton_backend")
    for name in list(_ORIGINALS):
        sys.modules[name].linear_cross_entropy = _ORIGINALS.pop(name)
    State.armed, State.handoff = False, None


def originals() -> dict[str, object]:
    """verl's objects that `install` replaced (tests compare against them)."""
    return dict(_ORIGINALS)


install()

from .verl_batch import TraceTrainerMixin, TraceVerlConfig, install_trace_trainer, trace_batch_fields  # noqa: E402
from .verl_loss import TraceVerlLoss  # noqa: E402

__all__ = ["FusedLinearForPPO", "linear_cross_entropy", "TraceVerlLoss", "TraceVerlConfig", "TraceTrainerMixin",
           "trace_batch_fields", "install_trace_trainer", "install", "uninstall"]
