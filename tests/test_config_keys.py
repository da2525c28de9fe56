"""Every key of the config schema either works or is refused when the config loads: the toy config runs one step
with each key set to a valid value other than its default (with what that value needs beside it, e.g. a data file
for data.task = "math"), and the values that cannot run here are refused by load_config with a one-line error
naming the key (values by load_config, what a run needs beyond them by Config.check_runnable, which
`python -m trace_train` calls before anything loads). A key added to the schema without an entry here fails the
first test."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from trace_train.config import Config, load_config  # noqa: E402

BASE = ["train.max_steps=1", "train.prompts_per_step=2", "train.rollouts_per_prompt=2", "train.max_new_tokens=4"]
MATH = ["data.task=math", "data.train_files={math}", "trace.annotator=self"]
CLOSED_PORT = "http://127.0.0.1:9/v1"  # discard port: nothing listens, every request fails fast (counted)

# key -> (its non-default value, further overrides it needs). {math}: a JSONL of math problems; {model}: a saved
# tiny model folder.
RUNS: dict[str, tuple[str, list[str]]] = {
    "model.path": ("{model}", []),
    "model.tiny_layers": ("1", []),
    "model.tiny_hidden": ("32", []),
    "model.tiny_heads": ("2", []),
    "model.dtype": ("bfloat16", []),
    "model.compute_dtype": ("bfloat16", []),
    "model.activation_checkpointing": ("true", []),
    "model.attn_implementation": ("eager", []),  # sdpa: tests/test_model_families.py; flex, flash: REFUSED on the CPU
    "data.task": ("math", MATH[1:]),
    "data.train_files": ("{math}", MATH[:1] + MATH[2:]),
    "data.eval_files": ("{math}", MATH + ["train.eval_k=2"]),
    "data.min_ops": ("2", ["data.max_ops=3"]),
    "data.max_ops": ("5", []),
    "data.pool_size": ("3", []),
    "train.algorithm": ("opd_all", []),
    "train.max_steps": ("2", []),
    "train.output_dir": ("{out}/elsewhere", []),
    "train.seed": ("7", []),
    "train.lr": ("1e-3", []),
    "train.prompts_per_step": ("1", []),
    "train.rollouts_per_prompt": ("3", []),
    "train.max_new_tokens": ("6", []),
    "train.temperature": ("0.7", []),
    "train.engine": ("hf", []),
    "train.mini_batches": ("2", []),
    "train.epochs": ("2", []),
    "train.micro_batch_tokens": ("20", []),
    "train.packing": ("false", []),
    "train.packing_row_tokens": ("64", []),
    "train.grad_clip": ("0.5", []),
    "train.lr_schedule": ("cosine", ["train.max_steps=2"]),
    "train.warmup_steps": ("1", ["train.max_steps=2"]),
    "train.min_lr_ratio": ("0.1", ["train.lr_schedule=linear"]),
    "train.lr_decay_steps": ("3", ["train.lr_schedule=linear"]),
    "train.weight_decay": ("0.01", []),
    "train.adam_beta1": ("0.8", []),
    "train.adam_beta2": ("0.99", []),
    "train.adam_eps": ("1e-6", []),
    "train.grad_sync": ("micro_batch", ["train.micro_batch_tokens=20"]),
    "train.checkpoint_every": ("1", ["train.max_steps=2"]),
    "train.keep_checkpoints": ("1", ["train.max_steps=2", "train.checkpoint_every=1"]),
    "train.resume": ("true", []),
    "train.export_hf": ("false", []),
    "train.lift_metric": ("true", []),
    "train.eval_every": ("1", MATH + ["data.eval_files={math}", "train.eval_k=1", "train.max_steps=2"]),
    "train.eval_k": ("1", MATH + ["data.eval_files={math}"]),
    "train.eval_problems": ("1", MATH + ["data.eval_files={math}"]),
    "train.report_to": ("tensorboard", []),
    # vLLM's settings: used by train.engine = "vllm" (the real-vLLM job runs them), inert with the HF engine
    "train.vllm_gpu_memory_utilization": ("0.5", []),
    "train.vllm_kv_cache_gib": ("0.5", []),
    "train.vllm_max_model_len": ("256", []),
    "train.wandb_project": ("other-project", []),
    "loss.clip_low": ("0.1", []),
    "loss.clip_high": ("0.2", []),
    "loss.beta": ("0.04", []),
    "loss.aggregation": ("seq-mean-token-mean", []),
    "loss.advantage_norm": ("mean", []),
    "loss.kl_term_clip": ("0.05", []),
    "loss.kl_clip_mode": ("grad", ["loss.kl_term_clip=0.05"]),
    "loss.is_correction": ("sequence_mask", []),
    "loss.is_clip_min": ("0.5", ["loss.is_correction=token_mask"]),
    "loss.is_clip_max": ("2.0", ["loss.is_correction=token_truncate", "train.epochs=2"]),
    "trace.w0": ("0.3", []),
    "trace.hold_steps": ("0", []),
    "trace.decay_steps": ("5", ["trace.hold_steps=0"]),
    "trace.forward_kl": ("false", []),
    "trace.reverse_kl": ("false", []),
    "trace.span_cap": ("0.5", []),
    "trace.annotator": ("self", []),
    "trace.teacher": ("snapshot", []),
    "trace.snapshot_every": ("1", ["trace.teacher=snapshot", "train.max_steps=2"]),
    "trace.opd_all_direction": ("forward", ["train.algorithm=opd_all"]),
    "trace.measure_spans": ("true", ["train.algorithm=grpo", "train.lift_metric=true"]),
    "trace.api_base_url": (CLOSED_PORT, ["trace.annotator=api", "trace.api_model=m"]),
    "trace.api_model": ("m", ["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}"]),
    "trace.api_key_env": ("TRACE_TEST_KEY", ["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}",
                                              "trace.api_model=m"]),
    "trace.api_timeout_s": ("0.5", ["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}", "trace.api_model=m"]),
    "trace.api_retries": ("0", ["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}", "trace.api_model=m"]),
    "trace.api_deadline_s": ("1.0", ["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}", "trace.api_model=m"]),
    "trace.api_max_reply_bytes": ("1000", ["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}",
                                           "trace.api_model=m"]),
}

# What cannot run, refused at load with the message's key (some only where a dependency is missing).
REFUSED: list[tuple[list[str], str, bool]] = [
    (["train.engine=vllm"], 'train.engine = "vllm"', importlib.util.find_spec("vllm") is None),
    (["train.report_to=wandb"], "train.report_to = 'wandb'", importlib.util.find_spec("wandb") is None),
    (["train.report_to=tensorboard"], "train.report_to = 'tensorboard'",
     importlib.util.find_spec("tensorboard") is None),
    (["trace.annotator=api"], "trace.api_base_url", True),
    (["trace.annotator=api", f"trace.api_base_url={CLOSED_PORT}"], "trace.api_model", True),
    (["data.task=math"], "data.train_files", True),
    (["data.task=math", "data.train_files=x.jsonl"], "trace.annotator=rule", True),
    (["data.eval_files=x.jsonl"], "data.eval_files", True),
    # flex_attention has no backward on the CPU, flash-attn no wheel for this machine: refused here
    # (test_model_families.py checks the package and dtype conditions)
    (["model.attn_implementation=flex_attention"], "model.attn_implementation = 'flex_attention' needs a CUDA",
     not torch.cuda.is_available()),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation = 'flash_attention_2' needs",
     not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None),
    (["model.attn_implementation=flash_attention_3"], "model.attn_implementation = 'flash_attention_3' needs",
     not torch.cuda.is_available() or importlib.util.find_spec("flash_attn_interface") is None),
]


def _schema_keys() -> list[str]:
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def test_every_schema_key_has_a_run():
    assert sorted(RUNS) == sorted(_schema_keys())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from trace_train.config import ModelConfig
    from trace_train.model import build_char_tokenizer, build_tiny_model

    root = tmp_path_factory.mktemp("inputs")
    tok = build_char_tokenizer()
    build_tiny_model(ModelConfig(), tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "math.jsonl", "w") as f:
        for a, b in ((1, 2), (3, 4), (2, 5)):
            f.write(json.dumps({"problem": f"what is {a}+{b}", "solution": f"{a}+{b}={a + b}", "answer": a + b}) + "\n")
    return {"model": str(root / "model"), "math": str(root / "math.jsonl")}


@pytest.mark.job
@pytest.mark.parametrize("key", sorted(RUNS))
def test_one_step_with_the_key_changed(key, files, tmp_path, monkeypatch):
    from trace_train.train import run

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    value, extra = RUNS[key]
    if key == "train.report_to" and importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (refused at load: REFUSED)")
    fill = dict(files, out=str(tmp_path))
    overrides = [*BASE, f"train.output_dir={tmp_path}", *(x.format(**fill) for x in extra),
                 f"{key}={value.format(**fill)}"]
    cfg = load_config("toy", overrides)
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) != getattr(getattr(load_config("toy"), section), name)
    history = run(cfg)
    assert history and all(math.isfinite(row["loss"]) for row in history), history
    if key.startswith("data.eval") or key.startswith("train.eval"):
        assert "eval_avg_at_k" in history[-1]


@pytest.mark.parametrize("overrides,needle,applies", REFUSED)
def test_what_cannot_run_is_refused_at_load(overrides, needle, applies):
    if not applies:
        pytest.skip("the dependency is installed: the key runs (test_one_step_with_the_key_changed)")
    with pytest.raises(ValueError) as e:
        load_config("toy", overrides).check_runnable()  # python -m trace_train: "config error: ...", status 2
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)

