"""The ``batchnorm`` command line: --version, unknown commands, and help texts in plain words."""

from __future__ import annotations

import argparse
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
