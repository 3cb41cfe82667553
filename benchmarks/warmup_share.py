"""CPU cost of the background compile when several processes start together on one empty cache (issue 19).

Starts ``--procs`` Python processes at once on one fresh ``NUMBA_CACHE_DIR``; each makes one BatchNorm call
(which starts the warm-up), waits until numba is ready, and reports its own CPU time and that of its
finished children (the compile process it started, reaped by its warm-up thread) from ``getrusage``. Run
with ``--procs 1`` and ``--procs 4`` (the default does both) and compare the totals: one compile at a time
means four processes cost one compile plus four cache loads. Target: total ≤ 1.3× the single process's.

    python benchmarks/warmup_share.py [--procs 1 4] [--kernels all|smoke] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, resource, sys, time
import torch, batchnorm
from batchnorm.kernels import dispatch, warmup
t = time.perf_counter()
batchnorm.BatchNorm(16)(torch.randn(8, 16))
ready = dispatch.wait_ready(float(sys.argv[1]))
time.sleep(0.5)  # the warm-up thread reaps its child right after the cache is complete
s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"ready": ready, "wait_s": time.perf_counter() - t, "self_cpu_s": s.ru_utime + s.ru_stime,
                  "children_cpu_s": c.ru_utime + c.ru_stime,
                  "reason": warmup.warm_up_status(detail=True)["reason"]}))
"""


def run(procs: int, kernels: str, timeout: float) -> dict:
    cache = tempfile.mkdtemp(prefix="bn-share-")
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_BACKEND"}
    env.update(NUMBA_CACHE_DIR=cache, BATCHNORM_WARMUP="process", BATCHNORM_WARMUP_KERNELS=kernels,
               BATCHNORM_CALIBRATE="0")
    t = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, "-c", CHILD, str(timeout)], env=env, stdout=subprocess.PIPE, text=True)
          for _ in range(procs)]
    rows = []
    for p in ps:
        try:
            out, _ = p.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        rows.append(json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ready": False})
    wall = time.perf_counter() - t
    total = sum(r.get("self_cpu_s", 0) + r.get("children_cpu_s", 0) for r in rows)
    return {"procs": procs, "wall_s": round(wall, 1), "total_cpu_s": round(total, 1),
            "children_cpu_s": round(sum(r.get("children_cpu_s", 0) for r in rows), 1),
            "all_ready": all(r.get("ready") for r in rows), "per_process": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 4])
    p.add_argument("--kernels", default="all", choices=["all", "smoke"])
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = [run(n, args.kernels, args.timeout) for n in args.procs]
    base = results[0]["total_cpu_s"]
    for r in results:
        r["vs_first"] = round(r["total_cpu_s"] / base, 2) if base else None
        print(f"{r['procs']} process(es): wall {r['wall_s']} s, CPU {r['total_cpu_s']} s "
              f"(compile children {r['children_cpu_s']} s), {r['vs_first']}x the first row, all ready: {r['all_ready']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"kernels": args.kernels, "load_average": os.getloadavg(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
