"""Process group and FSDP2 sharding. `torchrun --nproc_per_node=K` sets the environment; a plain
`python -m trace_train` is world size 1 and runs without a process group or sharding.

gloo on the CPU (tests, the demo), NCCL on CUDA. Each rank owns whole prompt groups (advantages are per
group), the loss normalisers are the global batch's, and gradients are summed, not averaged, across
ranks (each rank's loss is its share of one global loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum of each value over ranks (fp64)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def all_max(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def _all_reduce(self, values: list[float], op) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @property
    def _comm_device(self):
        return self.device if dist.get_backend() == "nccl" else "cpu"


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = torch.device("cuda", local)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return Dist(rank, world, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(lm) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Qwen3, Llama, Mistral, ... : model.layers)."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__} (expected .model.layers)")
    return list(layers)


def shard(policy, d: Dist, compute_dtype: str = "", activation_checkpointing: bool = False):
    """FSDP2: fully_shard each decoder layer, then the root (embedding, final norm and LM head in one group,
    which keeps tied embeddings tied). compute_dtype: mixed precision (parameters cast to it for compute,
    gradients reduced in fp32); empty: the parameters' own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        # non-reentrant checkpointing composes with FSDP2's hooks
        policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if d.world == 1:
        return policy.to(d.device)
    policy.to(d.device)
    mp = (MixedPrecisionPolicy(param_dtype=getattr(torch, compute_dtype), reduce_dtype=torch.float32)
          if compute_dtype else MixedPrecisionPolicy())
    for layer in decoder_layers(policy.lm):
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    register_fsdp_forward_method(policy, "generate")
    register_fsdp_forward_method(policy, "teacher_outputs")
    return policy
