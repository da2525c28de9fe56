"""TRL's own GRPO test file, run twice offline: with `trl.GRPOTrainer`, then with `TraceGRPOTrainer` in its
place. Prints each pass's counts and every test whose outcome differs (docs/development.md).

    python .ci/trl_own_tests.py PATH/TO/trl/tests [--work DIR] [-k EXPR] [--timeout S] [--passes trl,trace]

PATH/TO/trl/tests is a TRL checkout's tests folder (nothing of TRL's is kept in this repository). The driver
copies the test file and the helpers it imports into a temporary folder, writes the offline stand-ins
(`trl_standins.py`: tiny models of the named architectures in a hub cache, the `zen` prompts) and the conftest
(`trl_own_conftest.py`) there, and runs pytest once per pass. Exit status 1 when a test passes with TRL and not
with ours, unless it is one of KNOWN (the differences docs/development.md explains).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TEST_FILE = "test_grpo_trainer.py"
HELPERS = ("__init__.py", "conftest.py", "testing_utils.py", "testing_constants.py")

# Tests that pass with GRPOTrainer and are expected not to with ours, by test-id prefix, with the reason.
KNOWN: dict[str, str] = {}


def prepare(tests_dir: Path, work: Path) -> None:
    dst = work / "tests"
    dst.mkdir(parents=True, exist_ok=True)
    for name in HELPERS + (TEST_FILE,):
        shutil.copy(tests_dir / name, dst / name)
    shutil.copy(HERE / "trl_own_conftest.py", work / "conftest.py")
    hub = work / "hub"
    if not hub.exists():
        code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import trl_standins as s; "
                f"s.build_hub_cache({str(hub)!r})")
        subprocess.run([sys.executable, "-c", code], check=True, env=environment(work, "trl", 0),
                       stdout=subprocess.DEVNULL)


def environment(work: Path, trainer: str, timeout: int) -> dict:
    env = dict(os.environ)
    path = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(work / "hf_home"), HF_HUB_CACHE=str(work / "hub"),
               HF_DATASETS_CACHE=str(work / "datasets"), TOKENIZERS_PARALLELISM="false",
               TRL_STANDINS_DIR=str(HERE), TRL_OWN_TESTS_TRAINER=trainer, TRL_OWN_TESTS_TIMEOUT=str(timeout))
    return env


def run_pass(work: Path, trainer: str, timeout: int, keyword: str | None, extra: list[str]) -> dict[str, tuple]:
    """test id -> (outcome, reason, number of `_compute_loss` calls)."""
    report, calls = work / f"{trainer}.xml", work / f"{trainer}_loss_calls.json"
    cmd = [sys.executable, "-m", "pytest", f"tests/{TEST_FILE}", "-p", "no:cacheprovider", "-q", "-rN",
           f"--junitxml={report}", "-o", "junit_family=xunit1"] + (["-k", keyword] if keyword else []) + extra
    env = dict(environment(work, trainer, timeout), TRL_OWN_TESTS_CALLS=str(calls))
    with open(work / f"{trainer}.log", "w") as log:
        subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    counted = {node.split("::", 1)[1]: n for node, n in json.loads(calls.read_text()).items()} if calls.exists() else {}
    return {test_id: (o, why, counted.get(test_id, 0)) for test_id, (o, why) in outcomes(report).items()}


def outcomes(report: Path) -> dict[str, tuple]:
    """test id -> (outcome, first line of the reason) from pytest's JUnit XML."""
    result = {}
    for case in ET.parse(report).iter("testcase"):
        test_id = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome, reason = "passed", ""
        for child in case:
            kind = child.tag
            if kind in ("failure", "error"):
                outcome, reason = "failed", child.get("message") or ""
            elif kind == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                reason = child.get("message") or ""
        result[test_id] = (outcome, reason.strip().splitlines()[0][:300] if reason.strip() else "")
    return result


def counts(result: dict[str, tuple]) -> str:
    names = ("passed", "failed", "skipped", "xfailed")
    text = ", ".join(f"{sum(1 for r in result.values() if r[0] == n)} {n}" for n in names)
    ran = [r[2] for r in result.values() if r[2]]
    return f"{text}; _compute_loss ran in {len(ran)} tests ({sum(ran)} calls)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests_dir", type=Path, help="a TRL checkout's tests folder")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test (0: none)")
    parser.add_argument("--passes", default="trl,trace", help="comma-separated: trl, trace")
    args, extra = parser.parse_known_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="trl_own_tests_"))
    prepare(args.tests_dir.resolve(), work)
    results = {}
    for trainer in args.passes.split(","):
        results[trainer] = run_pass(work, trainer, args.timeout, args.keyword, extra)
        print(f"{trainer:5s} pass: {counts(results[trainer])}  (log: {work / (trainer + '.log')})", flush=True)
    if set(results) != {"trl", "trace"}:
        return 0
    trl, ours = results["trl"], results["trace"]
    unexpected = 0
    for test_id in sorted(set(trl) | set(ours)):
        a, b = trl.get(test_id, ("absent", "", 0)), ours.get(test_id, ("absent", "", 0))
        if a[0] == b[0] == "passed" and a[2] and not b[2]:  # passing without our loss would prove nothing
            unexpected += 1
            print(f"DIFF {test_id}: passes, but TraceGRPOTrainer._compute_loss never ran UNEXPECTED")
        if a[0] == b[0]:
            continue
        known = next((why for prefix, why in KNOWN.items() if test_id.startswith(prefix)), None)
        if a[0] == "passed" and known is None:
            unexpected += 1
        tag = f"known: {known}" if known else ("UNEXPECTED" if a[0] == "passed" else "")
        print(f"DIFF {test_id}: trl {a[0]}, trace {b[0]} {b[1]!r} {tag}".rstrip())
    print(f"{unexpected} unexpected difference(s)")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
