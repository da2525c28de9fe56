"""Per-rank GPU memory of a run on paper, from what the trainer allocates (trace_train.dist / train / policy
and trace_kernels' chunked loss), for a decoder-only transformer of Llama / Qwen3 shape:

    python -m trace_train.memory_plan --config qwen3-8b-trace-fkl --arch qwen3-8b --world 8 --gpu-gib 80

Every term is an upper bound of its phase and the training total adds the phases' transients as if they
coincided, so the total over-counts. Not counted (not in this code's accounting): the CUDA context and NCCL
buffers, allocator fragmentation, and the colocated vLLM engine (asleep during training: level 1 keeps
neither weights nor KV cache on the GPU); `overhead_gib` reserves room for them. Attention is assumed to
use a memory-efficient kernel (flash / memory-efficient SDPA: O(T) memory), which holds for packed
micro-batches; a padded batch falling back to the math SDPA kernel allocates [B, heads, T, T] scores.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .config import Config, load_config

GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """A Llama / Qwen3-shaped decoder: RMSNorm, GQA attention (Qwen3: q/k norms), gated MLP."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qk_norm: bool = True

    def layer_params(self) -> int:
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * q_out + 2 * self.hidden * kv_out + q_out * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return attn + mlp + norms

    def root_params(self) -> int:
        """FSDP's root group: embedding, LM head (one tensor when tied) and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()


# Published Hugging Face configs (config.json of Qwen/Qwen3-8B and Qwen/Qwen3-1.7B).
ARCHS = {
    "qwen3-8b": Arch(hidden=4096, layers=36, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936,
                     tied=False),
    "qwen3-1.7b": Arch(hidden=2048, layers=28, intermediate=6144, heads=16, kv_heads=8, head_dim=128, vocab=151936,
                       tied=True),
}

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def plan(cfg: Config, arch: Arch, world: int, tokens: int | None = None, chunk_mb: float = 256.0) -> dict:
    """{component: bytes} per rank during the training phase, and the rollout phase's resident part.

    tokens: tokens in one micro-batch's student forward (default train.micro_batch_tokens, which also
    counts the teacher's sequences, so an upper bound). chunk_mb: trace_kernels' chunk budget."""
    t = cfg.train
    P = arch.params()
    master = _BYTES[cfg.model.dtype]
    compute = _BYTES[cfg.model.compute_dtype or cfg.model.dtype]
    reduce = 4 if cfg.model.compute_dtype else master  # MixedPrecisionPolicy(reduce_dtype=float32)
    T = tokens if tokens is not None else t.micro_batch_tokens
    if T <= 0:
        raise ValueError("tokens: give the micro-batch size when train.micro_batch_tokens is 0 (one micro-batch)")
    snapshot = cfg.trace.teacher == "snapshot" and t.algorithm != "grpo"
    teacher = t.algorithm != "grpo"
    reference = cfg.loss.beta > 0
    H, inter, V = arch.hidden, arch.intermediate, arch.vocab
    q_out, kv_out = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    # what one layer's forward keeps for its backward: 2 norm outputs, q, k, v, attention output, o_proj
    # output, and the MLP's gate, up, act(gate) and their product
    layer_acts = T * (2 * H + q_out + 2 * kv_out + q_out + H + 4 * inter) * compute
    p = {
        # persistent, sharded 1/world
        "parameters (sharded, fp32 masters)": P * master / world,
        "gradients (sharded)": P * master / world,
        "AdamW exp_avg + exp_avg_sq (sharded)": 2 * P * 4 / world,
        "teacher snapshot (sharded)": P * master / world if snapshot else 0,
        "reference policy for loss.beta (sharded)": P * master / world if reference else 0,
        # accumulation without communication: FSDP keeps every parameter's gradient unsharded, in the reduce
        # dtype, on every rank until the last micro-batch's backward
        "unsharded gradient accumulation (grad_sync=step)": P * reduce if t.grad_sync == "step" else 0,
        # gathered for compute: the root group for the whole forward + backward, two layers (one prefetched)
        "gathered root group (embedding, LM head, norm)": arch.root_params() * compute,
        "gathered decoder layers (current + prefetched)": 2 * arch.layer_params() * compute,
        "teacher LM-head weight clone": V * H * compute if snapshot else 0,
        # activations with checkpointing: every layer's input, then one layer recomputed and its backward
        "checkpointed layer inputs": arch.layers * T * H * compute if cfg.model.activation_checkpointing
        else arch.layers * layer_acts,
        "one layer recomputed + its backward": 2 * layer_acts if cfg.model.activation_checkpointing else layer_acts,
        "teacher forward (no grad, one layer live)": layer_acts if teacher else 0,
        "reference forward (no grad, one layer live)": layer_acts if reference else 0,
        # trace_loss: [rows, V] chunk buffers within the budget, the fp32 [V, H] weight-gradient accumulator
        # (computed in the forward), and the LM head's gradient it returns
        "loss chunk buffers (chunk budget)": chunk_mb * 2**20,
        "loss fp32 weight-gradient accumulator": V * H * 4,
        "LM-head gradient (unsharded, compute dtype)": V * H * compute,
        # the root group's reduce-scatter input, cast to the reduce dtype (the largest group)
        "root reduce-scatter buffer": arch.root_params() * reduce,
    }
    rollout = P * master / world * (1 + snapshot + reference) + 2 * P * 4 / world
    return {"components": p, "training_total": sum(p.values()), "rollout_resident": rollout, "params": P}


def fits(result: dict, gpu_gib: float, overhead_gib: float = 6.0, vllm_fraction: float = 0.0) -> dict:
    """Whether the training total and the rollout phase (resident state + vLLM's gpu_memory_utilization share
    of the card) fit `gpu_gib` with `overhead_gib` reserved."""
    budget = (gpu_gib - overhead_gib) * GIB
    rollout = result["rollout_resident"] + vllm_fraction * gpu_gib * GIB
    return {"training": result["training_total"] <= budget, "rollout": rollout <= budget,
            "training_gib": result["training_total"] / GIB, "rollout_gib": rollout / GIB,
            "budget_gib": budget / GIB}


def format_plan(result: dict, verdict: dict) -> str:
    lines = [f"{'component':52s} {'GiB':>7s}"]
    for name, b in result["components"].items():
        lines.append(f"{name:52s} {b / GIB:7.2f}")
    lines.append(f"{'training total (transients added as if together)':52s} {verdict['training_gib']:7.2f}")
    lines.append(f"{'rollout phase (resident state + vLLM share)':52s} {verdict['rollout_gib']:7.2f}")
    lines.append(f"{'budget (GPU less overhead)':52s} {verdict['budget_gib']:7.2f}")
    lines.append(f"fits: training {verdict['training']}, rollouts {verdict['rollout']}; "
                 f"{result['params'] / 1e9:.3f} B parameters")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trace_train.memory_plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=80.0)
    ap.add_argument("--overhead-gib", type=float, default=6.0)
    ap.add_argument("--vllm-fraction", type=float, default=0.35, help="vLLM's gpu_memory_utilization")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    result = plan(load_config(args.config, args.overrides), ARCHS[args.arch], args.world)
    print(format_plan(result, fits(result, args.gpu_gib, args.overhead_gib, args.vllm_fraction)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
