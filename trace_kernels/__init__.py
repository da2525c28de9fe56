"""trace_kernels: GRPO + span-routed self-distillation losses from hidden states, never holding [N, V] logits."""

from ._grad_weight import get_grad_weight_accumulator, grad_weight_accumulator
from ._plan import chunk_budget, chunk_rows, get_chunk_budget_mb, get_chunk_rows
from .logprobs_entropy import logprobs_entropy
from .loss import token_logprobs, trace_loss
from .module import TraceLoss
from .output import TraceLossOutput

__all__ = ["trace_loss", "token_logprobs", "logprobs_entropy", "TraceLoss", "TraceLossOutput", "chunk_budget",
           "get_chunk_budget_mb", "chunk_rows", "get_chunk_rows", "grad_weight_accumulator",
           "get_grad_weight_accumulator"]
__version__ = "0.1.0"
