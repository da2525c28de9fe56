"""Process group and FSDP2 sharding. `torchrun --nproc_per_node=K` sets the environment; a plain
`python -m trace_train` is world size 1 and runs in a one-process group (in memory, no ports), so that the
model is wrapped by the same `fully_shard` at every world size: mixed precision, gradient reduction and
checkpoint layouts do not depend on how many processes run. (Not torch.autocast for the single process:
autocast picks a dtype per op, FSDP casts the parameters, so one process would compute differently from K.)

gloo on the CPU (tests, the demo), NCCL on CUDA. Each rank owns whole prompt groups (advantages are per
group), the loss normalisers are the global batch's, and gradients are summed, not averaged, across
ranks (each rank's loss is its share of one global loss).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Whether init_distributed created the process group (shutdown destroys only that one).
_OWN_GROUP = False


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
    """The process group of this run: torchrun's environment, or (without it) a one-process group on an
    in-memory store. A group that already exists (a caller's) is used as it is."""
    global _OWN_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), device)
    kw = dict(device_id=device) if cuda else {}
    if world == 1:
        kw.update(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda else "gloo", **kw)
    _OWN_GROUP = True
    return Dist(rank, world, device)


def shutdown() -> None:
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def decoder_layers(lm) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (Qwen3, Llama, Mistral, ... : model.layers)."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(lm).__name__} (expected .model.layers)")
    return list(layers)


def _is_meta(module) -> bool:
    return any(p.is_meta for p in module.parameters())


def shard(policy, d: Dist, compute_dtype: str = "", activation_checkpointing: bool = False):
    """FSDP2 at every world size (world 1 too: one code path, so mixed precision always applies):
    fully_shard each decoder layer, then the root (embedding, final norm and LM head in one group, which
    keeps tied embeddings tied). compute_dtype: mixed precision (parameters cast to it for compute,
    gradients reduced in fp32); empty: the parameters' own dtype.

    A policy built on the meta device (`model.load_policy(..., meta=True)`) is sharded before any weight
    exists and its shards are allocated empty on d.device: load them with `model.load_sharded_weights` (or
    copy them from another policy of the same layout). Otherwise the full model is moved to d.device first.

    Gradients are summed over ranks (divide factor 1: each rank's loss is its share of one global loss);
    `policy.loss_scale` is the factor the loss must still be multiplied by (1, or the world size on a
    torch without `set_gradient_divide_factor`, whose reduce-scatter averages). The policy is left in
    training mode: Hugging Face applies gradient checkpointing only in training mode."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if activation_checkpointing:
        # non-reentrant checkpointing composes with FSDP2's hooks (transformers 5 renamed the method)
        if hasattr(policy.lm, "activation_checkpointing_enable"):
            policy.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    meta = _is_meta(policy)
    if not meta:
        policy.to(d.device)
    mp = (MixedPrecisionPolicy(param_dtype=getattr(torch, compute_dtype), reduce_dtype=torch.float32)
          if compute_dtype else MixedPrecisionPolicy())
    modules = [fully_shard(layer, mp_policy=mp) for layer in decoder_layers(policy.lm)]
    modules.append(fully_shard(policy, mp_policy=mp))
    # A plain SUM reduce-scatter (a divide factor of 1 alone would be NCCL's PREMUL_SUM, which gloo lacks).
    # On a torch without these setters the reduction averages and the loss is scaled by the world instead.
    sum_reduction = all(hasattr(m, "set_gradient_divide_factor") and hasattr(m, "set_force_sum_reduction_for_comms")
                        for m in modules)
    for m in modules if sum_reduction else ():
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    policy.loss_scale = 1.0 if sum_reduction else float(d.world)
    if meta:
        materialize(policy, d.device)
    register_fsdp_forward_method(policy, "generate")
    register_fsdp_forward_method(policy, "teacher_outputs")
    register_fsdp_forward_method(policy, "token_logprobs")
    return policy.train()


def materialize(module, device) -> None:
    """Allocate a meta-built (sharded) module's parameters, uninitialised, on `device`. `to_empty` would
    also empty the buffers, which were computed at construction (RoPE's inv_freq, not in any checkpoint):
    they are kept."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if not b.is_meta}
    module.to_empty(device=device)
    with torch.no_grad():
        for n, b in buffers.items():
            module.get_buffer(n).copy_(b)


def set_gradient_sync(policy, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (False: FSDP accumulates them unsharded on each
    rank, without communication, until a backward with sync enabled)."""
    policy.set_requires_gradient_sync(enabled, recurse=True)
