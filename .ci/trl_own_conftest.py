"""conftest.py that `.ci/trl_own_tests.py` puts above a copy of TRL's tests package (never committed with TRL's
files). The hub names resolve through the offline hub cache the driver wrote (HF_HUB_OFFLINE=1, HF_HUB_CACHE);
`trl-internal-testing/zen` through `trl_standins.load_zen`. With TRL_OWN_TESTS_TRAINER=trace, `trl.GRPOTrainer`
is TraceGRPOTrainer before the test module imports it, so every test builds ours."""

import json
import os
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.environ["TRL_STANDINS_DIR"])

import datasets  # noqa: E402
import trl  # noqa: E402
import trl.import_utils as trl_import_utils  # noqa: E402
from trl_standins import load_zen, load_zen_image  # noqa: E402

# The test file's helpers come from TRL's main branch, which checks optional packages that TRL 1.16 does not
# name; those packages are absent here, so their tests are skipped as on a machine without them.
for _name in ("is_joblib_available",):
    if not hasattr(trl_import_utils, _name):
        setattr(trl_import_utils, _name, lambda: False)

# liger-kernel is installed here, but its kernels are Triton GPU kernels, and once applied they stay patched into
# transformers' model modules for every later test. Without a GPU it is hidden, as on a machine without it
# (its tests are skipped; the ones that expect an ImportError without it get one).
if not torch.cuda.is_available():
    import transformers.trainer  # noqa: F401
    import trl.trainer.grpo_trainer  # noqa: F401

    sys.modules["liger_kernel"] = None
    for _module in list(sys.modules.values()):
        if getattr(_module, "__name__", "").startswith(("transformers", "trl")) and \
                hasattr(_module, "is_liger_kernel_available"):
            _module.is_liger_kernel_available = lambda *args, **kwargs: False

_load_dataset = datasets.load_dataset


def _offline_load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
    if path == "trl-internal-testing/zen":
        return load_zen(name, split, streaming)
    if path == "trl-internal-testing/zen-image":
        return load_zen_image(name, split, streaming)
    return _load_dataset(path, name, *args, split=split, streaming=streaming, **kwargs)


# The test module does `from datasets import load_dataset` after this file is imported.
datasets.load_dataset = _offline_load_dataset

TRAINER = os.environ.get("TRL_OWN_TESTS_TRAINER", "trl")
if TRAINER == "trace":
    from trace_train.integrations.trl import TraceGRPOTrainer

    trl.GRPOTrainer = TraceGRPOTrainer
EXPECTED = trl.GRPOTrainer

# How often each test ran the pass's `_compute_loss` (the driver checks ours ran wherever TRL's did).
_LOSS_CALLS: dict[str, int] = {}
_CURRENT = [""]
_compute_loss = EXPECTED._compute_loss


def _counted_compute_loss(self, model, inputs):
    _LOSS_CALLS[_CURRENT[0]] = _LOSS_CALLS.get(_CURRENT[0], 0) + 1
    return _compute_loss(self, model, inputs)


EXPECTED._compute_loss = _counted_compute_loss


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TRL_OWN_TESTS_CALLS")
    if path:
        with open(path, "w") as f:
            json.dump(_LOSS_CALLS, f, indent=1)


def pytest_report_header(config):
    return f"trl_own_tests: GRPOTrainer is {EXPECTED.__module__}.{EXPECTED.__name__}"


def pytest_collection_modifyitems(session, config, items):
    # The swap must have reached the test module, or the second pass would silently test TRL again.
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "GRPOTrainer") and module.GRPOTrainer is not EXPECTED:
            raise pytest.UsageError(f"{module.__name__}.GRPOTrainer is {module.GRPOTrainer}, not {EXPECTED}")


class _TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise _TestTimeout(f"test ran over TRL_OWN_TESTS_TIMEOUT={os.environ.get('TRL_OWN_TESTS_TIMEOUT')} s")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # pytest-timeout is not installed here: an alarm per test keeps one hung test from stalling a pass.
    _CURRENT[0] = item.nodeid
    limit = int(os.environ.get("TRL_OWN_TESTS_TIMEOUT", "0"))
    if limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
    try:
        yield
    finally:
        if limit:
            signal.alarm(0)
