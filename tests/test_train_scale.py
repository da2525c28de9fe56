"""What an 8B run on many GPUs needs, checked on the CPU: sharded loading (2 ranks, gloo), mixed precision
and activation checkpointing at world size 1 and with any rollout engine, gradient accumulation that
reduces once per step, learning-rate schedules, checkpoint retention, config ranges, and the refusal of
models whose logits are not hidden @ lm_head.weight.T."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from trace_train import checkpoint as checkpoint_mod  # noqa: E402
from trace_train import train as train_mod  # noqa: E402
from trace_train.config import RANGES, Config, load_config  # noqa: E402
from trace_train.dist import decoder_layers, init_distributed, shutdown  # noqa: E402
from trace_train.heads import HeadMap  # noqa: E402
from trace_train.model import (  # noqa: E402
    build_char_tokenizer,
    check_lm_head,
    check_lm_head_config,
    load_policy,  # noqa: E402
)
from trace_train.optim import build_optimizer, lr_factor  # noqa: E402
from trace_train.routing import route  # noqa: E402
from trace_train.step import batch_loss  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _torchrun(*args) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "scale_worker.py"), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---- sharded loading


def _save_model(folder, hidden: int, layers: int, vocab: int, tie: bool) -> int:
    """A Qwen3 saved as a Hugging Face folder (safetensors, fp32) with the char tokenizer; returns its bytes."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_char_tokenizer()
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                      max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_sharded_loading_equals_full_loading_with_half_the_memory(tmp_path):
    """2 ranks: the meta-device build + per-rank reads gives bit-identical weights and losses to every rank
    loading the whole model and sharding it, and each rank's peak resident memory during the build grows by
    about half the model instead of the whole (measured with getrusage in the ranks)."""
    folder = tmp_path / "hf"
    model_bytes = _save_model(folder, hidden=256, layers=2, vocab=65536, tie=False)  # ~140 MB in fp32
    for how in ("full", "sharded"):
        _torchrun("load", folder, how, tmp_path)
    full = torch.load(tmp_path / "full-weights.pt")
    sharded = torch.load(tmp_path / "sharded-weights.pt")
    assert full.keys() == sharded.keys()
    for k in full:
        assert torch.equal(full[k], sharded[k]), k
    growth = {}
    for how in ("full", "sharded"):
        ranks = [json.load(open(tmp_path / f"{how}-rank{r}.json")) for r in range(2)]
        growth[how] = [(x["peak_rss_kib"] - x["rss_before_kib"]) * 1024 for x in ranks]
        if how == "sharded":
            for a, b in zip(ranks, [json.load(open(tmp_path / f"full-rank{r}.json")) for r in range(2)]):
                assert a["loss"] == b["loss"]
    print(f"model {model_bytes / 2**20:.0f} MiB; peak RSS growth per rank (MiB): "
          f"full {[round(g / 2**20) for g in growth['full']]}, sharded {[round(g / 2**20) for g in growth['sharded']]}")
    # every rank of the old path holds the whole model; the sharded ranks hold half of it plus a tensor slice
    assert min(growth["full"]) > 0.9 * model_bytes
    assert max(growth["sharded"]) < 0.75 * model_bytes


# ---- gradient accumulation


def test_gradients_reduced_once_per_step_equal_the_per_micro_batch_reduction(tmp_path):
    """2 ranks, 3 micro-batches each: accumulating unsharded and reduce-scattering a sum on the last
    micro-batch gives the gradients of reducing every micro-batch with FSDP's average and the loss scaled by
    the world size (the trainer before), with one reduce-scatter per FSDP group instead of three. Only the
    order of fp32 additions differs (3 micro-batches x 2 ranks): 1e-6 of each tensor's largest entry."""
    _torchrun("accum", tmp_path)
    out = torch.load(tmp_path / "accum.pt")
    before, once = out["grads"]["every_micro_batch"], out["grads"]["once"]
    assert before.keys() == once.keys()
    for k in before:
        scale = before[k].abs().max().item()
        assert scale > 0, k  # every parameter gets a gradient from the GRPO loss
        torch.testing.assert_close(once[k], before[k], rtol=0, atol=1e-6 * scale, msg=k)
    groups = out["fsdp_groups"]
    assert out["reduce_scatters"] == {"every_micro_batch": 3 * groups, "once": groups}


# ---- mixed precision and activation checkpointing at world size 1, with any engine


class _Recorder:
    """Forward calls and input dtypes of one MLP (inside a checkpointed decoder layer)."""

    def __init__(self, policy):
        self.calls, self.dtypes = 0, []
        mlp = decoder_layers(policy.lm)[0].mlp
        self.handle = mlp.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if torch.is_grad_enabled():
            self.calls += 1
            self.dtypes.append(args[0].dtype)


def _loss_and_backward(policy, tok):
    lens = [4, 3]
    routing = route(lens, [False, False], [[], []], [[], []], algorithm="grpo", lam=0.0, global_responses=2,
                    global_tokens=7)
    prompts, responses = [tok("Q:1+2")["input_ids"]] * 2, [tok("A:3;")["input_ids"], tok("A:4")["input_ids"]]
    out = batch_loss(policy, tok.pad_token_id, prompts, responses, torch.tensor([1.0, -1.0]), routing,
                     Config().loss)
    out.loss.backward()
    return out


@pytest.mark.parametrize("checkpointing", [True, False])
def test_world_one_computes_in_the_compute_dtype_and_recomputes_layers(tmp_path, checkpointing):
    """A single process (no torchrun) is sharded like any world size: with compute_dtype = bfloat16 the
    layers compute in bf16 over fp32 master weights, and with activation checkpointing each layer's forward
    runs again in backward (2 calls with gradient enabled instead of 1)."""
    cfg = load_config("toy", ["model.compute_dtype=bfloat16", f"model.activation_checkpointing={checkpointing}"])
    d = init_distributed()
    try:
        policy, tok = train_mod.build_policy(cfg, d)
        rec = _Recorder(policy)
        _loss_and_backward(policy, tok)
    finally:
        shutdown()
    assert policy.training and policy.lm.training
    assert rec.dtypes and set(rec.dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in policy.parameters())
    assert rec.calls == (2 if checkpointing else 1)


def test_checkpointing_active_whatever_mode_the_engine_leaves(tmp_path, monkeypatch):
    """A model loaded from a folder (from_pretrained would return it in eval mode) trained one step with an
    engine that leaves the policy in eval mode (as an engine that never runs it might): the loss still runs
    in training mode, so the layers are recomputed in backward."""
    folder = tmp_path / "hf"
    _save_model(folder, hidden=64, layers=2, vocab=64, tie=True)
    seen = {}
    real_build, real_engine = train_mod.build_policy, train_mod.make_engine

    def build(cfg, d, weights_from=None):
        policy, tok = real_build(cfg, d, weights_from)
        seen.setdefault("rec", _Recorder(policy))
        return policy, tok

    def engine(*args, **kwargs):
        inner = real_engine(*args, **kwargs)

        class EvalEngine:
            def generate(self, prompts, k, seeds):
                out = inner.generate(prompts, k, seeds)
                inner.policy.eval()
                return out
        return EvalEngine()

    monkeypatch.setattr(train_mod, "build_policy", build)
    monkeypatch.setattr(train_mod, "make_engine", engine)
    cfg = load_config("toy", [f"model.path={folder}", "model.activation_checkpointing=true", "train.max_steps=1",
                              "train.algorithm=grpo", "train.prompts_per_step=2", "train.rollouts_per_prompt=2",
                              "train.max_new_tokens=4", f"train.output_dir={tmp_path / 'run'}",
                              "train.export_hf=false"])
    train_mod.run(cfg)
    assert seen["rec"].calls == 2  # one micro-batch: its forward, and its recomputation in backward


# ---- learning-rate schedule and AdamW settings


def test_lr_schedules():
    f = lr_factor
    assert [f(s, "constant", 0, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    assert [f(s, "constant", 4, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    # linear from 1 at the end of warmup (step 2) to min_lr_ratio at the last step (step 7)
    assert [f(s, "linear", 2, 8, 0.1) for s in range(9)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.82, 0.64, 0.46, 0.28, 0.1, 0.1])
    cos = [f(s, "cosine", 0, 5) for s in range(5)]
    assert cos == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    # no room to decay: the first step after warmup at full lr, later ones at the floor
    assert f(0, "cosine", 0, 1) == 1.0 and f(3, "linear", 3, 4) == 1.0 and f(4, "linear", 3, 4) == 0.0
    with pytest.raises(ValueError, match="lr_schedule"):
        f(0, "step", 0, 10)


def test_optimizer_takes_its_settings_from_the_config():
    cfg = load_config(None, ["train.lr=0.01", "train.weight_decay=0.1", "train.adam_beta1=0.8", "train.adam_beta2=0.95",
                             "train.adam_eps=1e-6", "train.lr_schedule=linear", "train.warmup_steps=2",
                             "train.max_steps=4"])
    p = torch.nn.Parameter(torch.ones(3))
    opt, sched = build_optimizer([p], cfg.train)
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.1)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.0])


# ---- config ranges


def test_every_numeric_config_key_has_a_range():
    import dataclasses

    cfg = Config()
    numeric = {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))
               if isinstance(getattr(getattr(cfg, s.name), f.name), (int, float))
               and not isinstance(getattr(getattr(cfg, s.name), f.name), bool)}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("override", [
    "trace.snapshot_every=0", "train.lr=0", "train.warmup_steps=-1", "train.adam_beta2=1.0",
    "train.adam_eps=0", "train.keep_checkpoints=-1", "loss.clip_low=1.0", "loss.beta=-0.1", "trace.w0=1.5",
    "trace.hold_steps=-1", "train.micro_batch_tokens=-5", "model.tiny_heads=0", "data.pool_size=-1",
    "train.min_lr_ratio=2", "train.grad_clip=0", "trace.api_retries=-1",
])
def test_out_of_range_values_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + " must be "):
        load_config(None, [override])


def test_nan_from_toml_is_refused(tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nlr = nan\n")
    with pytest.raises(ValueError, match=r"train\.lr must be > 0"):
        load_config(str(tmp_path / "c.toml"))


@pytest.mark.parametrize("override,match", [
    ("train.lr_schedule=step", "train.lr_schedule"), ("train.grad_sync=never", "train.grad_sync"),
    ("model.compute_dtype=fp8", "model.compute_dtype"), ("model.dtype=half", "model.dtype"),
    ("data.max_ops=0", "data.max_ops"),
])
def test_bad_choices_are_refused_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


# ---- checkpoint retention


def test_prune_keeps_the_latest_k_and_the_one_latest_json_names(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    (tmp_path / "checkpoint-notes").mkdir()  # not a step checkpoint: left alone
    removed = checkpoint_mod.prune_checkpoints(str(tmp_path), keep=2, protect=str(tmp_path / "checkpoint-000008"))
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-000002", "checkpoint-000004"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-000006", "checkpoint-000008", "checkpoint-notes"]


def test_keep_checkpoints_in_a_run_and_old_ones_removed_only_after_the_marker(tmp_path, monkeypatch):
    """keep_checkpoints = 1: after each save only the newest checkpoint remains, and at the moment older ones
    are removed latest.json already names the new one (a crash before leaves the old ones, never fewer)."""
    real = checkpoint_mod.prune_checkpoints
    marker_at_prune = []

    def spy(out_dir, keep, protect):
        marker_at_prune.append((json.load(open(os.path.join(out_dir, "latest.json")))["path"], protect))
        return real(out_dir, keep, protect)

    monkeypatch.setattr(checkpoint_mod, "prune_checkpoints", spy)
    cfg = load_config("toy", [f"train.output_dir={tmp_path}", "train.prompts_per_step=2", "train.rollouts_per_prompt=2",
                              "train.max_new_tokens=4", "train.max_steps=3", "train.checkpoint_every=1",
                              "train.keep_checkpoints=1", "train.algorithm=grpo", "train.export_hf=false"])
    train_mod.run(cfg)
    assert [m == p for m, p in marker_at_prune] == [True, True, True]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-000003"]


# ---- models whose logits are not hidden @ lm_head.weight.T


@pytest.mark.parametrize("family,attr,value,expected", [
    ("Gemma2Config", "final_logit_softcapping", 30.0, HeadMap(1.0, 30.0)),
    ("Gemma3TextConfig", "final_logit_softcapping", 30.0, HeadMap(1.0, 30.0)),
    ("CohereConfig", "logit_scale", 0.0625, HeadMap(0.0625, None)), ("Cohere2Config", "logit_scale", 0.25,
                                                                     HeadMap(0.25, None)),
    ("GraniteConfig", "logits_scaling", 8.0, HeadMap(0.125, None)),
    ("FalconH1Config", "lm_head_multiplier", 0.5, HeadMap(0.5, None)),
])
def test_logit_transforms_become_trace_loss_options(family, attr, value, expected):
    """Softcapping and scales are passed to trace_loss (trace_train/heads.py, the list the TRL integration reads
    too); tests/test_heads.py checks the log-probs against each model's own logits."""
    import transformers

    config = getattr(transformers, family)(**{attr: value})
    assert check_lm_head_config(config) == expected
    setattr(config, attr, None if attr == "final_logit_softcapping" else 1.0)  # neutral: the identity
    assert check_lm_head_config(config).identity


def test_an_unverified_logit_transform_is_refused_naming_the_attribute():
    import transformers

    config = transformers.Qwen3Config()
    config.logits_scaling = 8.0  # Granite divides by it, HyperCLOVA X multiplies: unknown for this model type
    with pytest.raises(ValueError, match="logits_scaling"):
        check_lm_head_config(config)


@pytest.mark.parametrize("meta", [False, True])
def test_a_real_tiny_granite_with_logits_scaling_loads_with_its_map(tmp_path, meta):
    """End to end: a tiny Granite saved to a folder; both loaders load it, and the policy takes 1 / logits_scaling
    as trace_loss's logit_scale."""
    from transformers import GraniteConfig, GraniteForCausalLM

    tok = build_char_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=64)
    GraniteForCausalLM(GraniteConfig(logits_scaling=8.0, **kw)).save_pretrained(tmp_path / "scaled")
    tok.save_pretrained(tmp_path / "scaled")
    from trace_train.config import ModelConfig
    from trace_train.policy import Policy

    model, _ = load_policy(ModelConfig(path=str(tmp_path / "scaled")), meta=meta)
    assert model.config.logits_scaling == 8.0
    assert Policy(model).head_kwargs == {"logit_scale": 0.125, "logit_softcap": None}


def test_an_lm_head_bias_is_refused():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         tie_word_embeddings=False))
    check_lm_head(model)
    model.lm_head = torch.nn.Linear(16, 32, bias=True)
    with pytest.raises(ValueError, match="lm_head.bias"):
        check_lm_head(model)


# ---- the memory plan


@pytest.mark.parametrize("tied", [True, False])
def test_memory_plan_counts_the_parameters_of_a_real_model(tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trace_train.memory_plan import Arch

    arch = Arch(hidden=32, layers=3, intermediate=48, heads=4, kv_heads=2, head_dim=16, vocab=50, tied=tied)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         tie_word_embeddings=tied))
    assert arch.params() == sum(p.numel() for p in model.parameters())
    assert arch.layer_params() == sum(p.numel() for p in model.model.layers[0].parameters())


def test_memory_plan_of_the_8b_recipe_fits_an_80gb_h100():
    """The shipped 8B recipe on 8 x H100 80 GB (79.6 GiB usable) with 6 GiB reserved: it fits; accumulating
    unsharded gradients (grad_sync = step) would add the whole model's fp32 gradient to every rank."""
    from trace_train.memory_plan import ARCHS, GIB, fits, plan

    cfg = load_config("qwen3-8b-trace-fkl")
    arch = ARCHS["qwen3-8b"]
    assert cfg.train.grad_sync == "micro_batch" and 8.19e9 < arch.params() < 8.20e9
    result = plan(cfg, arch, world=8)
    c = result["components"]
    assert c["parameters (sharded, fp32 masters)"] == arch.params() * 4 / 8
    assert c["AdamW exp_avg + exp_avg_sq (sharded)"] == arch.params() * 8 / 8
    assert c["checkpointed layer inputs"] == 36 * 16384 * 4096 * 2
    assert c["loss fp32 weight-gradient accumulator"] == 151936 * 4096 * 4
    verdict = fits(result, gpu_gib=79.6, overhead_gib=6.0, vllm_fraction=0.35)
    assert verdict["training"] and verdict["rollout"]
    assert 40 < verdict["training_gib"] < 45  # 42.7 GiB
    step = plan(load_config("qwen3-8b-trace-fkl", ["train.grad_sync=step"]), arch, world=8)
    assert step["training_total"] - result["training_total"] == arch.params() * 4
    assert step["training_total"] / GIB > 73  # within 1 GiB of the budget: not the recipe's choice
