"""The README's `trace_loss` example runs as written and produces what it says."""

from __future__ import annotations

import os
import re

import torch


def test_readme_example_runs():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = re.search(r"## Using `trace_loss`\s+```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    out, hidden, weight = scope["out"], scope["hidden"], scope["weight"]
    assert torch.isfinite(out.loss)
    for leaf in (hidden, weight):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().max() > 0
    assert out.fkl.shape == (scope["M"],) and out.rkl.shape == (scope["M"],)
