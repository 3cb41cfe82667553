"""Every script in examples/ runs on small settings and prints a figure that is checked against a bound.

The scripts run at the same time as subprocesses (started once per module, killed at teardown if still
running), each with one thread and a timeout; each test then reads one script's output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds per script; a few seconds each on a quiet 2-core machine

#: script -> arguments of its small setting
RUNS = {
    "precise_bn.py": ["--steps", "60"],
    "fold_for_deployment.py": ["--steps", "5"],
    "masked_sequences.py": ["--steps", "60", "--samples", "1000"],
    "adapt_to_shift.py": ["--steps", "60"],
    "finetune_frozen_bn.py": ["--steps", "60"],
    "ddp_train.py": ["--epochs", "1", "--samples", "1000"],
}


@pytest.fixture(scope="module")
def outputs():
    env = dict(os.environ, OMP_NUM_THREADS="1", BATCHNORM_WARMUP="process", PYTHONUNBUFFERED="1")
    procs = {}
    for script, args in RUNS.items():
        cmd = [sys.executable, str(ROOT / "examples" / script), *args]
        if script == "ddp_train.py":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
        procs[script] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True, start_new_session=True)
    results = {}
    try:
        for script, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                out, _ = proc.communicate()
                out += f"\n(killed after {TIMEOUT} s)"
            results[script] = (proc.returncode, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return results


def _run(outputs, script: str) -> str:
    code, out = outputs[script]
    assert code == 0, f"{script} exited with {code}:\n{out[-3000:]}"
    return out


def _number(out: str, pattern: str) -> float:
    m = re.search(pattern, out)
    assert m, f"no match for {pattern!r} in:\n{out[-2000:]}"
    return float(m.group(1))


def test_every_example_is_run():
    assert set(RUNS) == {p.name for p in (ROOT / "examples").glob("*.py")}


def test_precise_bn_recovers_eval_accuracy(outputs):
    out = _run(outputs, "precise_bn.py")
    before = _number(out, r"with the running averages: ([\d.]+)")
    after = _number(out, r"after precise BN: ([\d.]+)")
    assert after > before + 0.02 and after > 0.8


def test_fold_keeps_outputs_and_leaves_no_bn(outputs):
    out = _run(outputs, "fold_for_deployment.py")
    assert _number(out, r"output difference: ([\d.e+-]+)") < 1e-4
    assert _number(out, r"BatchNorm modules left in the folded model: (\d+)") == 0


def test_masked_statistics_count_real_steps_only(outputs):
    out = _run(outputs, "masked_sequences.py")
    assert _number(out, r"unpadded steps: max difference ([\d.e+-]+)") < 1e-5
    assert _number(out, r"\(10 classes\): ([\d.]+)") > 0.2  # chance is 0.1


def test_adapt_lowers_the_error_on_shifted_data(outputs):
    out = _run(outputs, "adapt_to_shift.py")
    source = _number(out, r"source statistics:\s+([\d.]+) %")
    adapted = _number(out, r"adapt \(256 samples, N=16\):\s+([\d.]+) %")
    pt = _number(out, r"prediction-time BN \(batches of 100\):\s+([\d.]+) %")
    assert adapted < source - 3 and pt < source - 3


def test_finetune_with_frozen_bn_learns_and_keeps_statistics(outputs):
    out = _run(outputs, "finetune_frozen_bn.py")
    assert _number(out, r"(\d+) frozen BN layers") == 20
    assert _number(out, r"during fine-tuning: ([\d.e+-]+)") == 0.0
    assert _number(out, r"digits 5-9 \(batch 4\): ([\d.]+)") > 0.5  # chance is 0.2


def test_ddp_sync_batchnorm_matches_one_process(outputs):
    out = _run(outputs, "ddp_train.py")
    for what in ("output", "input-grad", "running_mean", "running_var"):
        assert _number(out, rf"max \|{what} diff\|\s+([\d.e+-]+)") < 1e-10, what
    assert _number(out, r"running stats spread across ranks ([\d.e+-]+)") == 0.0
    assert _number(out, r"test acc ([\d.]+)") > 0.15  # one short epoch; chance is 0.1


def test_readme_ten_line_example_runs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Ten lines\n\n```python\n(.*?)```", text, re.S)
    assert block, "the README's 'Ten lines' section with a python block"
    assert len(block.group(1).strip().splitlines()) <= 14
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert type(scope["deployable"]).__name__.endswith("Folded") and scope["y"].shape == (4, 10, 16)


def test_readme_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = next(line for line in ci.splitlines() if line.startswith("pip install torch=="))
    assert command in readme
