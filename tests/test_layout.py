"""The layout's import rules, read from the source (every import statement, at any depth, relative ones resolved):
trace_kernels imports neither trace_train nor the benchmarks; the trainer (trace_train outside experiments/)
imports neither the research tools (trace_train.experiments) nor the benchmarks; and importing the product
really loads none of them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if rel[0] == "benchmarks":  # installed as trace_train.benchmarks
        rel = ["trace_train", *rel]
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _sources(top: str) -> list[str]:
    out = []
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
        out += [os.path.join(folder, f) for f in files if f.endswith(".py") and "__pycache__" not in folder]
    return sorted(out)


def imports_of(path: str) -> set[str]:
    """The absolute names of every module the file imports (relative imports resolved against its package)."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return found


def _offenders(files: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{os.path.relpath(f, ROOT)} imports {m}" for f in files for m in sorted(imports_of(f))
            if any(m == x or m.startswith(x + ".") for x in forbidden)]


def test_the_resolver_sees_relative_and_nested_imports():
    """The rule tests below mean something only if imports_of finds what a real offender would write."""
    demo = os.path.join(ROOT, "trace_train", "experiments", "demo.py")
    assert {"trace_train.config", "trace_train.experiments.plot", "trace_train.eval",
            "trace_train.experiments.machine"} <= imports_of(demo)  # `from ..config`, `from .plot`, inside a def
    bench = os.path.join(ROOT, "benchmarks", "packing_cpu.py")
    assert {"trace_train.benchmarks.rss", "trace_train.step"} <= imports_of(bench)


def test_trace_kernels_imports_neither_the_trainer_nor_the_benchmarks():
    assert not _offenders(_sources("trace_kernels"), ("trace_train", "benchmarks"))


def test_the_trainer_imports_neither_the_experiments_nor_the_benchmarks():
    product = [f for f in _sources("trace_train") if os.sep + "experiments" + os.sep not in f]
    assert len(product) > 20
    assert not _offenders(product, ("trace_train.experiments", "trace_train.benchmarks", "benchmarks"))


_LOADED = r"""
import sys
import trace_train.train, trace_train.eval, trace_train.memory_plan, trace_train.rollout, trace_train.tasks
import trace_train.integrations.trl, trace_train.integrations.trl_loss
print(",".join(sorted(m for m in sys.modules if m.startswith(("trace_train.experiments", "trace_train.benchmarks",
                                                                "benchmarks")))))
"""


def test_importing_the_product_loads_no_experiment_and_no_benchmark():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "-c", _LOADED], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout


def test_every_package_in_the_tree_is_listed_for_the_wheel():
    """pyproject lists the packages by hand (find cannot map benchmarks/ to trace_train.benchmarks): a new
    subpackage left out of the list would be missing from the wheel."""
    import tomllib

    st = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["tool"]["setuptools"]
    on_disk = {_module_name(f) for top in ("trace_kernels", "trace_train", "benchmarks") for f in _sources(top)
               if f.endswith("__init__.py")}
    assert set(st["packages"]) == on_disk
    assert st["package-dir"] == {"trace_train.benchmarks": "benchmarks"}
