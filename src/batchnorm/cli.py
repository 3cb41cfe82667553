"""The ``batchnorm`` command: ``batchnorm lab | demo | bench``; each subcommand lives in its own module."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "lab": ("batchnorm.lab.run", "run the experiments and write the HTML report"),
    "demo": ("batchnorm.demo", "train a 1-D CNN on MNIST-1D with and without BatchNorm"),
    "bench": ("batchnorm.bench", "time our kernels against PyTorch's batch norm"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: batchnorm {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
