"""``batchnorm doctor``: where the numba kernels stand on this machine, and why.

Prints, without compiling anything: whether numba is installed and usable in this process, where numba
caches our kernels (or why it cannot), whether that cache is complete for this installation, and the
crossover table "auto" dispatch would use at this process's thread counts (measured here, or built in).
``--wait SECONDS`` also starts the background warm-up and waits for it, then prints what it did.

Example::

    $ batchnorm doctor
    $ batchnorm doctor --wait 300 --json
"""

from __future__ import annotations

import argparse
import json
import sys


def report(wait: float | None = None) -> dict:
    """The facts ``batchnorm doctor`` prints, as a dict (``wait``: start the warm-up and wait that long first)."""
    import torch

    from .kernels import calibrate, safety, warmup

    out: dict = {"numba": None, "threads": torch.get_num_threads()}
    if not warmup.HAS_NUMBA:
        out["numba"] = "not installed: 'auto' uses native and composite only (pip install numba)"
        return out
    import numba

    out["numba"] = f"{numba.__version__}, usable here: {safety.numba_usable()} {safety.reason()}".strip()
    directory, locator = warmup.cache_location()
    out["cache_dir"], out["locator"] = directory, locator
    if directory is not None:
        done, why = warmup.cache_complete(directory)
        out["cache"] = "complete: loads in the background without a compile" if done else f"incomplete: {why}"
        threads = (torch.get_num_threads(), numba.get_num_threads())
        table = calibrate.load(directory, threads)
        alloc = calibrate.allocator()
        out["stored_crossovers"] = (f"measured for {threads[0]}/{threads[1]} threads, malloc {alloc}"
                                    if table is not None else f"none for {threads[0]}/{threads[1]} threads, malloc "
                                                              f"{alloc} yet (measured after the warm-up)")
    else:
        out["cache"] = "none: no writable cache location; set NUMBA_CACHE_DIR to a writable directory"
    if wait is not None:
        warmup.wait_ready(wait)
        warmup.wait_calibrated(wait)
    out["warm_up"] = warmup.warm_up_status(detail=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="batchnorm doctor", description="Say where the numba kernels stand on this "
                                "machine (cache, background compile, crossover table) and why.")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="start the background warm-up and wait up to this many seconds before reporting")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    if args.wait is not None and args.wait < 0:
        p.error(f"--wait must be 0 or more seconds, got {args.wait:g}.")
    out = report(args.wait)
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    for key, value in out.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<22} {v}")
        else:
            print(f"{key:<24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
