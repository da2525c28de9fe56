"""One rank of tests/test_trl_dist.py, started by `accelerate launch` (2 CPU processes on gloo: plain data
parallel, accelerate's FSDP2, DeepSpeed ZeRO-3). For each trainer named in --trainers it trains --steps steps
of the tiny model at --model from seed 0 and writes, per rank, out/<trainer>-rank<r>.json:

losses: the value of every `_compute_loss` call on this rank; entropy_masks: every `get_high_entropy_mask`
call's local masked entropies and the mask it returned (TRL's cross-rank quantile); grads: the first optimizer
step's full gradient of each parameter (gathered from its shards), as [name, list] (rank 0 only); logs: TRL's
log history; params: the parameters after training, summed per tensor; annotator_calls: what TRACE's annotator
saw on this rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trl_setup import PROMPTS  # noqa: E402

from trace_train.annotate import Annotation  # noqa: E402

ROWS = {"prompt": PROMPTS * 2, "problem": PROMPTS * 2, "answer": ["5", "41", "5", "3", "16", "-2"] * 2}


def digit_share(completions, **kwargs):
    """The fraction of a completion's characters that are digits: unlike a 0/1 reward, it gives almost every group
    of the tiny model's completions a nonzero spread, so that every step has a loss and gradient."""
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]


def full(t: torch.Tensor | None, param=None, grad: bool = True) -> torch.Tensor | None:
    """A gradient's (grad=True) or a parameter's whole value, from a DTensor (FSDP2) or a ZeRO-3 partition (a
    collective there: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if param is not None and hasattr(param, "ds_id"):  # ZeRO-3: values and gradients live in DeepSpeed's partitions
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        if grad:
            t = safe_get_full_grad(param)
        elif hasattr(param, "_z3_optimizer"):
            t = safe_get_full_fp32_param(param)
        else:  # before the engine exists: partitioned by from_pretrained's zero.Init
            with deepspeed.zero.GatheredParameters([param]):
                t = param.data.clone()
    if t is None:
        return None
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu()


def annotator(calls):
    def annotate(jobs, examples, seeds):
        calls.append([j.correct for j in jobs])
        return [Annotation(key_spans=[(0, 3)] if j.correct else [], error_spans=[] if j.correct else [(0, 2)],
                           diagnostic=None if j.correct else "wrong step") for j in jobs], 0
    return annotate


def privileged(row, diagnostic):
    return row["prompt"] + "A" + row["answer"] + ("D" if diagnostic else "") + "="


def run(name: str, args, record: dict):
    """name: trl | ours | trace, then any of +lora (PEFT LoRA on the attention projections), +bias (an untied head
    with a bias), +ga2 (gradient accumulation 2), +fsdp2 (torch's fully_shard on the trainer's model, then one fixed
    batch instead of training)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trace_train.integrations.trl import TraceGRPOConfig, TraceGRPOTrainer

    base, *mods = name.split("+")
    cls = GRPOTrainer if base == "trl" else TraceGRPOTrainer
    config_cls = TraceGRPOConfig if base == "trace" else GRPOConfig
    options = dict(output_dir=os.path.join(args.out, name), use_cpu=args.use_cpu, bf16=False, report_to="none",
                   per_device_train_batch_size=4, num_generations=4, max_completion_length=8, logging_steps=1,
                   save_strategy="no", seed=0, learning_rate=args.lr, max_steps=args.steps, loss_type=args.loss_type,
                   beta=0.0, temperature=0.7, top_entropy_quantile=args.top_entropy_quantile)
    if args.ddp_backend:
        options["ddp_backend"] = args.ddp_backend
    if "ga2" in mods:  # two micro-batches per optimizer step (and per generation: steps_per_generation = 2)
        options["gradient_accumulation_steps"] = 2
    if base == "trace":
        options.update(trace_w0=0.5, trace_hold_steps=10, trace_decay_steps=10, trace_reverse_kl=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    if "bias" in mods:  # the same seeded head on both trainers' models: untied, with a bias
        # from the config: under ZeRO-3 from_pretrained has already partitioned the embedding (shape [0])
        v, h = model.config.vocab_size, model.config.hidden_size
        head = torch.nn.Linear(h, v, bias=True)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            head.weight.copy_(0.2 * torch.randn(v, h, generator=g))
            head.bias.copy_(0.5 * torch.randn(v, generator=g))
        model.config.tie_word_embeddings = False
        model.lm_head = head
    peft_config = None
    if "lora" in mods:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)  # nonzero B: the adapters change the loss from step 0
    extra = dict(annotator=annotator(record["annotator_calls"]), privileged_prompt=privileged) if base == "trace" \
        else {}

    class FirstGrads(TrainerCallback):
        def on_pre_optimizer_step(self, targs, state, control, model=None, **kw):
            if state.global_step == 0:
                record["grads"] = grads_of(trainer.model, trainer.accelerator.is_main_process)

    torch.manual_seed(0)  # LoRA's initial weights: the same for both trainers (the Trainer then seeds itself)
    trainer = cls(model=model, reward_funcs=digit_share, args=config_cls(**options),
                  train_dataset=Dataset.from_dict(ROWS), processing_class=tok, peft_config=peft_config,
                  callbacks=[FirstGrads()], **extra)
    compute_loss, high_entropy_mask = trainer._compute_loss, trainer.get_high_entropy_mask

    def recorded_loss(model, inputs):
        head = trainer.accelerator.unwrap_model(model).get_output_embeddings().weight
        # ZeRO-3: the head's weight is partitioned when the loss starts (the trainer must gather it)
        record["head_status"].append(str(getattr(head, "ds_status", None)))
        loss = compute_loss(model, inputs)
        record["losses"].append(loss.item())
        return loss

    def recorded_mask(entropies, mask, threshold):
        out = high_entropy_mask(entropies, mask, threshold)
        record["entropy_masks"].append(dict(entropies=entropies[mask.bool()].tolist(),
                                            mask=out[mask.bool()].tolist(), quantile=threshold))
        return out

    trainer._compute_loss, trainer.get_high_entropy_mask = recorded_loss, recorded_mask
    record["params0"] = params_of(trainer.model)
    record.update(world_size=trainer.accelerator.num_processes, trainer=type(trainer).__name__,
                  distributed_type=str(trainer.accelerator.distributed_type),
                  trainable=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    if "fsdp2" in mods:
        one_sharded_batch(trainer, record, trace=base == "trace")
        return
    trainer.train()
    record.update(logs=[h for h in trainer.state.log_history if "loss" in h],
                  params=params_of(trainer.model))


def params_of(model) -> dict:
    """{name: [sum, sum of |.|]} of each trainable parameter's whole value (fp64 sums)."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            v = full(p.data, p, grad=False).double()
            out[n] = [float(v.sum()), float(v.abs().sum())]
    return out


def grads_of(model, keep: bool):
    """[[name, flat gradient]] of the trainable parameters, whole (gathered on every rank, kept on rank 0)."""
    grads = [(n, full(p.grad, p)) for n, p in model.named_parameters() if p.requires_grad]
    return [[n, g.reshape(-1).tolist()] for n, g in grads if g is not None] if keep else None


def one_sharded_batch(trainer, record, trace: bool):
    """FSDP2 on the CPU: accelerate 1.15 selects FSDP only for accelerator devices (on a CPU its FSDP config gives
    2 independent processes), so the model is sharded here with torch's fully_shard (each decoder layer, then the
    root, which holds the LM head: its weight becomes a DTensor). One fixed batch per rank (with TRACE spans for
    the TRACE trainer) goes through `_compute_loss` twice: unsharded (the reference: this rank's loss, and the
    gradient averaged over ranks by hand), then sharded (losses[1], grads: FSDP2's reduce-scattered gradient)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from trl_setup import random_batch

    from trace_train.integrations.trl import FORWARD, REVERSE

    model = trainer.model
    rank, world = dist.get_rank(), dist.get_world_size()
    vocab = len(trainer.processing_class)
    inputs = random_batch(vocab, seed=10 + rank, b=4, t=8)
    g = torch.Generator().manual_seed(20 + rank)
    inputs["old_per_token_logps"] = -2.0 - torch.rand(inputs["completion_ids"].shape, generator=g)
    if trace:
        b, t = inputs["completion_ids"].shape
        span = torch.zeros(b, t, dtype=torch.int8)
        span[0, 1:4], span[2, 0:2] = FORWARD, REVERSE
        inputs.update(trace_span=span, trace_lambda=torch.full((b,), 0.4),
                      trace_teacher_prompt_ids=torch.randint(3, vocab, (b, 6), generator=g),
                      trace_teacher_prompt_mask=torch.ones(b, 6, dtype=torch.long))
    model.train()
    trainer.current_gradient_accumulation_steps = 1

    def loss_of(batch):
        model.zero_grad(set_to_none=True)
        trainer._compute_loss(model, {k: v.clone() for k, v in batch.items()}).backward()

    loss_of(inputs)
    reference = []
    for n, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        reference.append([n, (grad / world).reshape(-1).tolist()])
    model.zero_grad(set_to_none=True)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    record["head_sharded"] = isinstance(model.get_output_embeddings().weight, DTensor)
    loss_of(inputs)
    record["grads"] = grads_of(model, trainer.accelerator.is_main_process)
    record["unsharded_grads"] = reference if trainer.accelerator.is_main_process else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--trainers", default="trl,ours")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--top-entropy-quantile", type=float, default=0.5)
    p.add_argument("--ddp-backend", default=None)
    p.add_argument("--no-use-cpu", dest="use_cpu", action="store_false",
                   help="TrainingArguments.use_cpu=False (FSDP and DeepSpeed: use_cpu=True would make it MULTI_CPU)")
    args = p.parse_args()
    for name in args.trainers.split(","):
        record = dict(losses=[], entropy_masks=[], annotator_calls=[], head_status=[], grads=None)
        run(name, args, record)
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(args.out, f"{name}-rank{rank}.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main()
