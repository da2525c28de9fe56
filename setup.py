from setuptools import find_packages, setup

setup(
    name="trace-kernels",
    version="0.1.0",
    description="Fused LM-head kernels for GRPO + span-routed self-distillation (TRACE), and a thin FSDP2 trainer",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["trace_kernels", "trace_kernels.*", "trace_train", "trace_train.*"]),
    python_requires=">=3.11",
    # torch is not pinned: an unpinned or newer-only requirement would pull a multi-GB CUDA build onto a
    # CPU machine; the Makefile installs torch==2.13.0 (CPU) first, and any torch >= 2.4 satisfies this.
    install_requires=["torch>=2.4", "triton>=3.0", "numpy"],
    extras_require={
        "train": ["transformers>=4.56", "accelerate", "safetensors", "math-verify", "tokenizers", "tqdm", "pyarrow"],
        "bench": ["liger-kernel>=0.6", "trl>=1.16", "pytest-benchmark", "matplotlib"],
        "dev": ["pytest", "hypothesis", "ruff"],
        "vllm": ["vllm"],
        "flash": ["flash-attn"],
    },
)
