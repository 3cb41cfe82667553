"""The ``batchnorm`` command line: --version, unknown commands, and help texts in plain words."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

import batchnorm
from batchnorm import cli, demo
from batchnorm.lab import run


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out.strip() == f"batchnorm {batchnorm.__version__}"


@pytest.mark.parametrize(
    "command, hint",
    [("labb", "Did you mean 'lab'?"), ("dmeo", "Did you mean 'demo'?"), ("frobnicate", None)],
)
def test_unknown_command_names_itself_and_the_valid_ones(command, hint, capsys):
    assert cli.main([command]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.search(rf"unknown command '{command}'; the commands are: lab, demo, bench", captured.err)
    assert (hint in captured.err) if hint else "Did you mean" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_help_lists_every_command(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert re.search(rf"^  {name}\s+\w", out, re.M), name
    assert "--version" in out


def _parser_of(main, argv_help=("--help",)):
    """The argparse parser a subcommand builds (captured by intercepting parse_args)."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            main(list(argv_help))
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


@pytest.mark.parametrize("name, main", [("demo", demo.main), ("lab", run.main)])
def test_every_option_is_described_in_plain_words(name, main):
    parser = _parser_of(main)
    assert parser.description and "``" not in parser.description and ":class:" not in parser.description
    for action in parser._actions:
        assert action.help and action.help.strip(), (name, action.dest)
        assert "``" not in action.help and ":class:" not in action.help and ":func:" not in action.help, action.help


@pytest.mark.parametrize(
    "argv, message",
    [(["--epochs", "0"], r"--epochs must be at least 1, got 0"), (["--lr", "-1"], r"--lr must be a positive number")],
)
def test_demo_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_installed_entry_point_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown command 'nope'" in proc.stderr and "Traceback" not in proc.stderr


BAD_BENCH_ARGS = [
    (["--shape", "8,-16"], r"--shape '8,-16': every size must be at least 1, got \(8, -16\)"),
    (["--shape", "0,16"], r"--shape '0,16': every size must be at least 1"),
    (["--shape", "foo"], r"--shape expects integers like 16,32,64,64"),
    (["--shape", "1,16"], r"needs more than 1 value per feature"),
    (["--shape", "8,16:zz"], r"flags from :cl"),
    (["--markdown", "/no/such/run.json"], r"--markdown: cannot read '/no/such/run.json' \(No such file"),
    (["--threads", "0"], r"--threads must be at least 1, got 0"),
    (["--repeats", "-2"], r"--repeats must be at least 1, got -2"),
    (["--backend", "cuda"], r"--backend must be one of auto, numba, composite, torch, native; got 'cuda'"),
]


@pytest.mark.parametrize("argv, message", BAD_BENCH_ARGS, ids=[" ".join(a) for a, _ in BAD_BENCH_ARGS])
def test_bench_rejects_bad_arguments_before_any_wait(argv, message, capsys, monkeypatch):
    from batchnorm import bench
    from batchnorm.kernels import dispatch, warmup

    def no_wait(*a, **k):
        raise AssertionError("bench waited for the numba kernels before checking its arguments")

    monkeypatch.setattr(dispatch, "wait_ready", no_wait)
    monkeypatch.setattr(warmup, "wait_ready", no_wait)
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_bench_markdown_of_a_file_that_is_not_a_run_is_a_usage_error(tmp_path, capsys):
    from batchnorm import bench

    path = tmp_path / "x.json"
    for text, message in (("not json", "is not a batchnorm bench result"), ('{"a": 1}', "no 'rows' list")):
        path.write_text(text)
        with pytest.raises(SystemExit) as exc:
            bench.main(["--markdown", str(path)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_bad_bench_shape_from_the_command_line_prints_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "bench", "--shape", "8,-16"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "BATCHNORM_WARMUP": "process"})
    assert proc.returncode == 2 and "every size must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr and "numba kernels" not in proc.stdout


def test_doctor_says_where_the_kernels_stand_and_why(capsys):
    from batchnorm import doctor
    from batchnorm.kernels import warmup

    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^warm_up:$", out, re.M) and re.search(r"^  reason\s+\S", out, re.M)
    assert re.search(r"^  crossovers\s+\S", out, re.M)
    rep = doctor.report()
    if warmup.HAS_NUMBA:
        assert rep["cache_dir"] == warmup.cache_location()[0]
        assert rep["cache"].startswith(("complete", "incomplete", "none"))
    with pytest.raises(SystemExit):
        doctor.main(["--wait", "-1"])
