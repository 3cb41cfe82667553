"""The ``batchnorm`` command: ``batchnorm lab | demo | bench | doctor``; each subcommand lives in its own module.

``batchnorm --version`` prints the version; ``batchnorm --help`` lists the commands; an unknown command
is named on stderr together with the valid ones (exit status 2, like argparse's usage errors).

Example::

    $ batchnorm lab --quick        # the smoke-test lab, report in ./lab-report-quick
    $ batchnorm labb
    batchnorm: unknown command 'labb'; the commands are: lab, demo, bench, doctor (see batchnorm --help).
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS = {
    "lab": ("batchnorm.lab.run", "run the experiments and write the report (report.html with plots, report.md, "
                                 "results.json)"),
    "demo": ("batchnorm.demo", "train a small 1-D CNN on MNIST-1D with and without BatchNorm and print both "
                               "test accuracies"),
    "bench": ("batchnorm.bench", "time our batch-norm kernels against PyTorch's"),
    "doctor": ("batchnorm.doctor", "say where the numba kernels stand here and why (cache, background compile, "
                                   "crossovers)"),
}


def _usage() -> str:
    lines = [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: batchnorm COMMAND [options]\n"
        "       batchnorm --version | --help\n\n"
        "Batch normalization for PyTorch: a lab that answers common questions about it, a demo and a benchmark.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "Run 'batchnorm COMMAND --help' for the options of a command."
    )


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand's ``main``; returns the exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"batchnorm {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"batchnorm: unknown command '{argv[0]}'; the commands are: {', '.join(COMMANDS)} (see batchnorm "
              f"--help).{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
