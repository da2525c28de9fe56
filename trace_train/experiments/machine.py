"""What a result depends on besides the code and the seed: the CPU's kernel set, library versions, threads.

Seeded runs repeat exactly on one machine with one software stack. Another CPU whose torch picks other
vectorised kernels (AVX2 vs AVX-512, or `ATEN_CPU_CAPABILITY` set), another thread count or another torch
build rounds differently; sampling turns those last-bit differences into different tokens, and the runs part.
Reports print this next to their numbers so a reader can tell which machine made them.
"""

from __future__ import annotations

import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """The facts a seeded CPU run's digits depend on (JSON-serialisable)."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def one_line(info: dict | None = None) -> str:
    info = info or describe()
    return (f"{info['cpu']} ({info['cpus']} CPUs, torch CPU kernels {info['cpu_capability']}, "
            f"{info['torch_threads']} threads), torch {info['torch']}, transformers {info['transformers']}, "
            f"Python {info['python']}")
