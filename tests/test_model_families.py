"""The model families trace-train is tested on, and the attention kernel a run uses.

Each family as a tiny model with the character tokenizer, saved to a local folder and trained by `trace-train` for
2 steps from model.path (built on the meta device, each tensor read from the safetensors files): the parameters
change, the loss is finite, the metrics are written. An MoE model's router aux loss is added as transformers' own
forward adds it (the same load_balancing_loss_func, the same attributes, the padding excluded), in the padded and
the packed layouts alike. model.attn_implementation: what the run's config and metrics record, auto's choice for
a model with attention softcapping (eager), and the refusals (sdpa with softcapping, an MoE aux loss trace_train
cannot compute)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from trace_train.config import ModelConfig, load_config  # noqa: E402
from trace_train.model import (  # noqa: E402
    build_char_tokenizer,
    check_model_config,
    load_policy,
    make_batch,
    resolve_attn_implementation,
    response_hidden,
    router_aux_loss,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=256, bos_token_id=None)


def family_config(family: str, tok):
    import transformers as tf

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if family == "qwen3":
        return tf.Qwen3Config(**SMALL, **ids, tie_word_embeddings=True)
    if family == "llama":
        return tf.LlamaConfig(**SMALL, **ids, tie_word_embeddings=False)
    if family == "mistral":
        return tf.MistralConfig(**SMALL, **ids, sliding_window=16, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**SMALL, **ids, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                 decoder_sparse_step=1, output_router_logits=True, router_aux_loss_coef=0.05,
                                 tie_word_embeddings=False)
    if family == "gemma2":  # attention softcapping 50, final logit softcapping 30 (Gemma 2's defaults)
        return tf.Gemma2Config(**SMALL, **ids, query_pre_attn_scalar=8, sliding_window=16)
    raise ValueError(family)


def save_family(family: str, folder, seed: int = 0, **changes) -> str:
    """A tiny random model of `family` with the character tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer()
    config = family_config(family, tok)
    for k, v in changes.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def safetensors_state(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


FAMILIES = ["qwen3", "llama", "mistral", "qwen3_moe"]
TWO_STEPS = ["train.max_steps=2", "train.prompts_per_step=2", "train.rollouts_per_prompt=2", "train.max_new_tokens=6",
             "train.lr=1e-2", "trace.hold_steps=0", "train.checkpoint_every=2"]


@pytest.mark.parametrize("family", FAMILIES)  # ~15 s for the four on 2 shared cores (the first pays the imports)
def test_family_trains_two_steps(family, tmp_path, monkeypatch):
    from trace_train.train import run

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = save_family(family, tmp_path / "model")
    before = safetensors_state(path)
    cfg = load_config("toy", [*TWO_STEPS, f"model.path={path}", f"train.output_dir={tmp_path / 'run'}"])
    history = run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1] and len(history) == 2
    assert all(math.isfinite(r["loss"]) and r["attn_implementation"] == "sdpa" for r in rows), rows
    after = safetensors_state(tmp_path / "run" / "hf")
    assert before.keys() <= after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, f"{family}: only {changed} changed"
    if family == "qwen3_moe":
        assert all(math.isfinite(r["router_aux_loss"]) and r["router_aux_loss"] > 0 for r in rows), rows
        assert any("mlp.gate" in k for k in changed)  # the router learns (the aux loss's gradient reaches it)
    else:
        assert "router_aux_loss" not in rows[0]


def test_gemma2_trains_two_steps(tmp_path, monkeypatch):
    """Gemma 2 through trace-train: attention softcapping on eager (auto), final logit softcapping in the loss."""
    from transformers import AutoConfig

    from trace_train.model import check_lm_head_config
    from trace_train.train import run

    path = save_family("gemma2", tmp_path / "model")
    assert check_lm_head_config(AutoConfig.from_pretrained(path)).logit_softcap == 30.0  # applied in the loss
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    history = run(load_config("toy", [*TWO_STEPS, f"model.path={path}", f"train.output_dir={tmp_path / 'run'}"]))
    assert len(history) == 2 and all(math.isfinite(r["loss"]) and r["attn_implementation"] == "eager"
                                     for r in history)


def test_attention_softcapping_eager_under_auto_refused_under_sdpa(tmp_path):
    path = save_family("gemma2", tmp_path / "model", final_logit_softcapping=None)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    assert hf.attn_logit_softcapping == 50.0
    assert resolve_attn_implementation(ModelConfig(path=path), hf) == "eager"
    assert resolve_attn_implementation(ModelConfig(path=path, attn_implementation="eager"), hf) == "eager"
    with pytest.raises(ValueError) as e:  # at load: what `python -m trace_train` prints as "config error: ..."
        load_config("toy", [f"model.path={path}", "model.attn_implementation=sdpa"]).check_runnable()
    msg = str(e.value)
    assert "model.attn_implementation = 'sdpa'" in msg and "attn_logit_softcapping = 50.0" in msg and "\n" not in msg
    load_config("toy", [f"model.path={path}"]).check_runnable()  # auto: accepted
    model, _ = load_policy(ModelConfig(path=path))  # the real loading: eager, softcapping applied
    assert model.config._attn_implementation == "eager"


def test_a_model_without_softcapping_keeps_auto_choice(tmp_path):
    path = save_family("llama", tmp_path / "model")
    expect = "sdpa" if not torch.cuda.is_available() else None  # on CUDA: flash-attn 2 where it imports (bf16)
    model, _ = load_policy(ModelConfig(path=path))
    if expect:
        assert model.config._attn_implementation == expect
    model, _ = load_policy(ModelConfig(path=path, attn_implementation="eager"), meta=True)
    assert model.config._attn_implementation == "eager"
    tiny, _ = load_policy(ModelConfig(attn_implementation="eager"))
    assert tiny.config._attn_implementation == "eager"


def test_router_aux_loss_as_transformers_computes_it(tmp_path):
    """The aux loss of response_hidden equals transformers' MoeCausalLMOutputWithPast.aux_loss on the padded batch,
    and the packed layout gives the same (its filler excluded as padding is); the policy's loss adds
    router_aux_loss_coef times it, and its gradient reaches the router."""
    import trace_kernels as tk
    from trace_train.policy import Policy

    path = save_family("qwen3_moe", tmp_path / "model")
    model, tok = load_policy(ModelConfig(path=path))
    aux = router_aux_loss(model)
    assert aux is not None and aux.coef == 0.05 and (aux.num_experts, aux.top_k) == (4, 2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (5, 3, 2)]
    responses = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (4, 6, 2)]
    padded = make_batch(prompts, responses, tok.pad_token_id)
    with torch.no_grad():
        ref = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, output_router_logits=True)
        _, ours_padded = response_hidden(model, padded, aux)
        packed = make_batch(prompts, responses, tok.pad_token_id, packed=True, row_tokens=12)
        assert packed.input_ids.shape[0] > 1 and min(packed.filled) < packed.input_ids.shape[1]  # rows with filler
        _, ours_packed = response_hidden(model, packed, aux)
    assert ref.aux_loss.item() > 0
    torch.testing.assert_close(ours_padded, ref.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_packed, ref.aux_loss, rtol=1e-5, atol=1e-6)

    policy = Policy(model)
    n = padded.targets.numel()
    kw = dict(targets=padded.targets, advantages=torch.zeros(n), pg_weight=torch.full((n,), 1.0 / n))
    out = policy(padded, kw, router_aux_weight=0.5)
    hidden = response_hidden(model, padded)
    plain = tk.trace_loss(hidden, model.get_output_embeddings().weight, **kw).loss
    torch.testing.assert_close(out.loss - plain, 0.5 * 0.05 * ref.aux_loss, rtol=1e-5, atol=1e-7)
    out.loss.backward()  # zero advantages: the GRPO term's gradient is zero, the router's comes from the aux loss
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_fused_experts_read_from_per_expert_files(tmp_path):
    """transformers 5 fuses an MoE layer's experts in memory ([E, 2I, H] gate_up_proj) and saves them per expert: the
    sharded loader (trace-train's path for model.path) reads them into the fused parameters as from_pretrained does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trace_train.model import load_sharded_weights

    path = save_family("qwen3_moe", tmp_path / "model", seed=3)
    expect = AutoModelForCausalLM.from_pretrained(path).state_dict()
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert not torch.equal(model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"],
                           expect["model.layers.1.mlp.experts.gate_up_proj"])
    load_sharded_weights(model, path)
    for name, t in model.state_dict().items():
        assert torch.equal(t, expect[name]), name


def test_router_aux_loss_off_without_output_router_logits(tmp_path):
    path = save_family("qwen3_moe", tmp_path / "model", output_router_logits=False)
    model, _ = load_policy(ModelConfig(path=path))
    assert router_aux_loss(model) is None  # transformers adds none either


def test_unknown_router_aux_loss_refused_by_name(tmp_path):
    """Llama 4's config carries output_router_logits and router_aux_loss_coef, and its modeling code no
    load_balancing_loss_func: refused at load, naming the model and the attribute."""
    from transformers import Llama4TextConfig

    folder = tmp_path / "llama4"
    Llama4TextConfig(output_router_logits=True, router_aux_loss_coef=0.01).save_pretrained(folder)
    with pytest.raises(ValueError) as e:
        check_model_config(ModelConfig(path=str(folder)))
    msg = str(e.value)
    assert "Llama4TextConfig.output_router_logits = True" in msg and "llama4_text" in msg and "\n" not in msg


def test_cli_eager_runs_and_is_recorded(tmp_path):
    """trace-train --config toy model.attn_implementation=eager: the run's config and metrics say eager; with auto
    the config keeps auto and notes the kernel the run used."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "trace_train", "--config", "toy", "train.max_steps=1", "train.prompts_per_step=2",
            "train.rollouts_per_prompt=2", "train.max_new_tokens=4"]
    res = subprocess.run([*base, "model.attn_implementation=eager", f"train.output_dir={tmp_path / 'eager'}"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(open(tmp_path / "eager" / "metrics.jsonl").readline())
    assert row["attn_implementation"] == "eager"
    assert 'attn_implementation = "eager"\n' in open(tmp_path / "eager" / "config.toml").read()

    from trace_train.config import Config, config_text, load_config

    text = config_text(Config(), resolved={"model.attn_implementation": "sdpa"})
    assert 'attn_implementation = "auto"  # this run: "sdpa"' in text
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(str(path)) == Config()  # the note is a comment: the file reads back as the config


def test_eval_json_records_the_kernel(tmp_path, monkeypatch):
    from trace_train.eval import main as eval_main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = save_family("qwen3", tmp_path / "model")
    out = tmp_path / "scores.json"
    args = ["--model", path, "--arith-ops", "1", "--n", "2", "--k", "1", "--max-new-tokens", "3", "--engine", "hf"]
    assert eval_main([*args, "--attn-implementation", "eager", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["attn_implementation"] == "eager" and scores["problems"] == 2
    # refused before anything loads: no CUDA or flash-attn here, and fp32 (--dtype's default) on a GPU
    assert eval_main([*args, "--attn-implementation", "flash_attention_2"]) == 2


def test_flash_attention_needs_cuda_flash_attn_and_16_bits(monkeypatch):
    """On the CPU the flash kernels are one-line config errors (tests/test_config_keys.py); here the other two
    conditions, with CUDA and the package made to look present."""
    from trace_train import config as config_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("flash_attn") else
                        real(name, *a))
    assert "needs flash-attn (pip install flash-attn" in config_mod.attn_missing("flash_attention_2", "bfloat16")
    assert "needs flash-attn-3" in config_mod.attn_missing("flash_attention_3", "bfloat16")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert config_mod.attn_missing("flash_attention_2", "bfloat16") is None
    msg = config_mod.attn_missing("flash_attention_2", "float32")
    assert "runs in bfloat16 / float16, not float32" in msg
    # auto falls back to sdpa where flash-attn cannot run (fp32), and picks it in bf16
    assert resolve_attn_implementation(ModelConfig(dtype="float32")) == "sdpa"
    assert resolve_attn_implementation(ModelConfig(compute_dtype="bfloat16")) == "flash_attention_2"


def test_unknown_attn_implementation_refused():
    with pytest.raises(ValueError, match=r"model.attn_implementation: unknown 'flash' \(auto \| eager"):
        load_config("toy", ["model.attn_implementation=flash"])
