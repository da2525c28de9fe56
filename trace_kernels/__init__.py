"""trace_kernels: GRPO + span-routed self-distillation losses from hidden states, never holding [N, V] logits."""

from .chunked import chunk_budget, get_chunk_budget_mb
from .logprobs_entropy import logprobs_entropy
from .loss import token_logprobs, trace_loss
from .module import TraceLoss
from .output import TraceLossOutput

__all__ = ["trace_loss", "token_logprobs", "logprobs_entropy", "TraceLoss", "TraceLossOutput", "chunk_budget",
           "get_chunk_budget_mb"]
__version__ = "0.1.0"
