"""The setuptools entry point for `pip install .` / `pip wheel .` and tools that look for a setup.py. All metadata,
requirements and package lists live in pyproject.toml: computing any of them here would bake the build machine's
platform into a pure wheel."""

from setuptools import setup

setup()
