"""Packaging: trace_kernels works without triton, shipped configs resolve by name, one version source, and
the repository stands alone (no file points to a document outside it). The installed wheel itself is
checked by .ci/check_wheel.sh (`make wheel-check`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from trace_train.config import load_config, resolve_config, shipped_configs

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

_NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError, as on a machine without it
import torch
import trace_kernels as tk
import trace_train.config  # noqa: F401
g = torch.Generator().manual_seed(0)
h, w = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(7, 4, generator=g, requires_grad=True)
y, a = torch.randint(0, 7, (5,), generator=g), torch.randn(5, generator=g)
ref = tk.trace_loss(h.double(), w.double(), y, a.double(), impl="reference").loss
for impl in ("torch", "auto"):
    out = tk.trace_loss(h, w, y, a, impl=impl)
    out.loss.backward()
    assert abs(out.loss.item() - ref.item()) < 1e-5 and h.grad.abs().max() > 0, (impl, out.loss, ref)
try:
    tk.trace_loss(h, w, y, a, impl="triton")
except ValueError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("impl='triton' ran without triton")
assert sys.modules["triton"] is None
print("ok")
"""


def test_trace_kernels_imports_and_runs_without_triton():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _NO_TRITON], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_shipped_config_resolves_by_name_and_path(tmp_path, monkeypatch):
    path = os.path.join(ROOT, "trace_train", "configs", "toy.toml")
    assert os.path.samefile(resolve_config("toy"), path) and os.path.samefile(resolve_config("toy.toml"), path)
    assert resolve_config(path) == path
    assert load_config("toy") == load_config(path)
    own = tmp_path / "toy"  # an existing file wins over the shipped config of the same name
    own.write_text("[train]\nmax_steps = 3\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_config("toy") == "toy" and load_config("toy").train.max_steps == 3
    with pytest.raises(ValueError, match="shipped: " + ", ".join(shipped_configs())):
        load_config("no-such-config")
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        resolve_config("sub/toy")


def test_one_version_source():
    """The version is written once, in trace_kernels/__init__.py; the package metadata reads it from there."""
    import trace_kernels

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "trace_kernels.__version__"}
    assert isinstance(trace_kernels.__version__, str) and trace_kernels.__version__.count(".") == 2


def test_setup_py_is_the_bare_setuptools_entry():
    """setup.py exists (the layout names one; `pip install .` goes through it) and passes setup() nothing: every
    piece of metadata stays in pyproject.toml, so that no requirement or package list is computed on the build
    machine (a pure wheel must not carry the builder's platform)."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [(c.func.id, c.args, c.keywords) for c in calls] == [("setup", [], [])]
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [("setuptools", ["setup"])]


def test_console_scripts_point_at_callables():
    import importlib

    scripts = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["scripts"]
    assert set(scripts) == {"trace-train", "trace-train-demo", "trace-study", "trace-eval", "trace-bench"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target


def test_no_file_cites_a_document_outside_the_repository():
    """Users read only what is in the repository: no file may send them to the internal design note."""
    try:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    needles = ("DESIGN" + ".md", "../" + "shared/")  # split so that this file does not match itself
    offenders = []
    for name in filter(None, files):
        full = os.path.join(ROOT, name)
        if not os.path.isfile(full):
            continue
        try:
            text = open(full, encoding="utf-8").read()
        except UnicodeDecodeError:
            continue  # binary (plots)
        offenders += [f"{name}: {n}" for n in needles if n in text]
    assert not offenders, offenders
