"""verl on the CPU for the tests of trace_train.integrations.verl: tiny Qwen3 models patched by verl's own
monkey patch, rollout batches in verl's layout (DataProto -> to_tensordict -> left_right_2_no_padding ->
prepare_micro_batches, all verl's code), and verl's engine step `FSDPEngineWithLMHead.forward_step` less its
device move and autocast (verl registers that engine for CUDA and NPU only; its prepare_model_inputs and
prepare_model_outputs, which the step is made of, run here unchanged)."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from verl import DataProto
from verl.models.transformers.monkey_patch import patch_forward_with_backends
from verl.utils import tensordict_utils as tu
from verl.workers.config import FSDPActorConfig
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding

VOCAB = 53  # not a multiple of any block size


def tiny_model(layers: int = 2, seed: int = 0, hidden: int = 32) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).float()
    model.train()
    return model


@pytest.fixture(autouse=True)
def restore_patches():
    """verl's monkey patch sets the model class's forward: put it back, and the integration as imported, after
    each test (imported into a test module, this runs around each of its tests)."""
    import trace_train.integrations.verl as tv
    from trace_train.integrations import verl_handoff

    forward = Qwen3ForCausalLM.forward
    yield
    Qwen3ForCausalLM.forward = forward
    tv.install()
    verl_handoff.disarm()


def patch(model, backend: str = "torch") -> None:
    """verl's own monkey patch, as its FSDP engine applies it with use_fused_kernels=True."""
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend=backend)


def actor_config(**overrides) -> FSDPActorConfig:
    options = dict(strategy="fsdp2", rollout_n=2, ppo_micro_batch_size_per_gpu=2, clip_ratio_low=0.2,
                   clip_ratio_high=0.28)
    options.update(overrides)
    return FSDPActorConfig(**options)


def rollout_batch(b: int = 4, p: int = 5, r: int = 7, seed: int = 0, temperature: float = 1.0) -> DataProto:
    """What verl's trainer holds before the actor update: left-padded prompts, right-padded responses of unequal
    lengths (one of 1 token), old / ref log-probs, per-sequence advantages, rollout importance weights."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [p, p - 2, p - 1, 2, p, 3][:b]
    response_lens = [r, 1, r - 2, 3, r - 1, 2][:b]
    prompts = torch.zeros(b, p, dtype=torch.long)
    responses = torch.zeros(b, r, dtype=torch.long)
    prompt_mask = torch.zeros(b, p, dtype=torch.long)
    response_mask = torch.zeros(b, r, dtype=torch.long)
    for i in range(b):
        prompts[i, p - prompt_lens[i]:] = torch.randint(3, VOCAB, (prompt_lens[i],), generator=g)
        prompt_mask[i, p - prompt_lens[i]:] = 1
        responses[i, :response_lens[i]] = torch.randint(3, VOCAB, (response_lens[i],), generator=g)
        response_mask[i, :response_lens[i]] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    old = (-4.0 + 0.4 * torch.randn(b, r, generator=g)) * response_mask  # ratios far on both sides of the clip
    ref = (-4.0 + 0.4 * torch.randn(b, r, generator=g)) * response_mask
    advantages = torch.randn(b, 1, generator=g).expand(b, r) * response_mask
    is_weights = (0.5 + torch.rand(b, r, generator=g)) * response_mask
    tensors = dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], dim=1),
                   attention_mask=attention_mask, position_ids=position_ids, response_mask=response_mask,
                   old_log_probs=old, ref_log_prob=ref, advantages=advantages.contiguous(),
                   rollout_is_weights=is_weights)
    return DataProto.from_single_dict(tensors, meta_info={"temperature": temperature})


def micro_batches(batch: DataProto, *, remove_padding: bool = True, calculate_entropy: bool = True,
                  global_batch_size: int | None = None, micro_batch_size: int = 2, drop=()) -> list:
    """verl's way from the trainer's batch to the engine's micro-batches (one data-parallel rank)."""
    batch = DataProto.from_single_dict({k: v for k, v in batch.batch.items() if k not in drop},
                                       meta_info=dict(batch.meta_info))
    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=calculate_entropy, global_batch_size=global_batch_size,
                         use_remove_padding=remove_padding, use_fused_kernels=True, use_dynamic_bsz=False,
                         micro_batch_size_per_gpu=micro_batch_size)
    tu.assign_non_tensor(td, batch_num_tokens=int(td["loss_mask"].sum()), dp_size=1)
    mbs, _ = prepare_micro_batches(td, dp_group=None)
    return mbs


def cpu_engine() -> FSDPEngineWithLMHead:
    """An FSDPEngineWithLMHead with only what prepare_model_inputs / prepare_model_outputs read (no FSDP)."""
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.pad_to_length, engine.pad_to_length_bucket = False, 8
    engine.use_ulysses_sp, engine.ulysses_sequence_parallel_size = False, 1
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    return engine


def forward_step(engine, model, micro_batch, loss_fn):
    """FSDPEngineWithLMHead.forward_step's inputs -> module -> outputs -> loss, on the CPU in fp32."""
    inputs, output_args = engine.prepare_model_inputs(micro_batch=micro_batch)
    raw = model(**inputs, use_cache=False)
    model_output = engine.prepare_model_outputs(output=raw, output_args=output_args, micro_batch=micro_batch,
                                                logits_processor_func=loss_fn)
    return loss_fn(model_output=model_output, data=micro_batch, dp_group=None)


def train_step(model, mbs, loss_fn) -> tuple[float, dict[str, torch.Tensor], list[dict]]:
    """One accumulation over the micro-batches, as forward_backward_batch runs it: (summed loss, grads, metrics)."""
    engine = cpu_engine()
    model.zero_grad(set_to_none=True)
    total, metrics = 0.0, []
    for mb in mbs:
        loss, m = forward_step(engine, model, mb, loss_fn)
        loss.backward()
        total += float(loss)
        metrics.append(m)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads, metrics


def verl_loss(config):
    return partial(ppo_loss, config=config)
