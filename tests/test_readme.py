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


def test_links_in_readme_and_docs_resolve_inside_the_repository():
    """Every relative link of README.md and docs/*.md names a file or folder of this repository."""
    import glob

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    pages = [os.path.join(root, "README.md"), *glob.glob(os.path.join(root, "docs", "*.md"))]
    checked, broken = 0, []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", open(page).read()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            checked += 1
            if not path.startswith(root + os.sep) or not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, root)}: {target}")
    assert checked >= 10 and not broken, broken
