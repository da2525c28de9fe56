"""A tiny Qwen3 with a character tokenizer saved to a folder (TRL reloads the reference model from its path
when beta > 0), and TRL trainers built on it for the CPU. Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

from trace_train.config import ModelConfig
from trace_train.model import build_char_tokenizer, build_tiny_model

PROMPTS = ["2+3=", "7*6-1=", "9-4=", "1+1+1=", "8*2=", "5-7="]


# A chat template for the character tokenizer, so that conversational prompt datasets work as with hub models.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


def save_tiny_model(folder, seed: int = 0) -> str:
    tok = build_char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    model = build_tiny_model(ModelConfig(tiny_layers=1, tiny_hidden=32, tiny_heads=2), tok, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def digit_reward(completions, **kwargs):
    """1 for a completion that starts with a digit, else 0: enough to give groups mixed rewards. Conversational
    completions are lists of messages: their last message's text counts."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(t[:1].isdigit()) for t in texts]


def make_trainer(cls, path, out_dir, *, config_cls=None, trainer_kwargs=None, dataset_rows=None, dtype=torch.float32,
                 **config):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    config_cls = config_cls or GRPOConfig
    defaults = dict(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=4,
                    num_generations=2, max_completion_length=8, logging_steps=1, save_strategy="no", seed=0,
                    learning_rate=1e-3)
    args = config_cls(**{**defaults, **config})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    rows = dataset_rows or {"prompt": PROMPTS}
    return cls(model=model, reward_funcs=digit_reward, args=args, train_dataset=Dataset.from_dict(rows),
               processing_class=tok, **(trainer_kwargs or {}))


def random_batch(vocab: int, *, b: int = 4, p: int = 5, t: int = 7, seed: int = 0, pad_id: int = 0):
    """A GRPO micro-batch as `_generate_and_score_completions` returns it: left-padded prompts, right-padded
    completions of different lengths (one of length 1), per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (b, p), generator=g)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = pad_id
    completion_ids = torch.randint(3, vocab, (b, t), generator=g)
    lengths = [t, 1, t - 2, 3][:b] + [t] * max(0, b - 4)
    completion_mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, :n] = 1
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_id)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(b, generator=g),
                num_items_in_batch=completion_mask.sum().float() * 2)


def loss_and_grads(trainer, inputs, accumulation: int = 1):
    """(loss, {name: grad}) of one `_compute_loss` call in training mode, as under `accumulation` steps."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, {k: (v.clone() if torch.is_tensor(v) else v)
                                                 for k, v in inputs.items()})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


TIMING = ("time", "runtime", "per_second", "flos")


def assert_logs_agree(ref_logs: list[dict], logs: list[dict], steps: int) -> None:
    """Two trainers' per-step log entries: `steps` of each, every logged metric but the timings of the reference
    present in ours and equal to 1e-4 relative (1e-6 absolute, for values near 0)."""
    assert len(ref_logs) == len(logs) == steps
    for ref_log, log in zip(ref_logs, logs):
        keys = [k for k in ref_log if not any(s in k for s in TIMING)]
        assert set(keys) <= set(log), set(keys) - set(log)
        for key in keys:
            assert log[key] == pytest.approx(ref_log[key], rel=1e-4, abs=1e-6), (key, log[key], ref_log[key])
