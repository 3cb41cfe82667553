"""Compile time of one training step of a CIFAR ResNet-18: torch's BN vs converted (issue 12 item 6).

Usage (one fresh process per contender; start them together on a shared machine and compare ratios):
    python benchmarks/compile_time.py torch 16
    python benchmarks/compile_time.py ours 16
    BATCHNORM_COMPILE=kernels python benchmarks/compile_time.py ours 16   # our custom ops under compile
Prints one JSON line (first compiled step, next step, graph breaks) and inductor's timers on stderr.
"""

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bn_compile_"))  # empty cache
os.environ.setdefault("BATCHNORM_WARMUP", "off")  # numba kernels load in the eager steps, not in the timing

import torch  # noqa: E402
from torch._dynamo.utils import compile_times, counters  # noqa: E402

import batchnorm as bn  # noqa: E402
from batchnorm import zoo  # noqa: E402


def main(which: str, width: int) -> None:
    torch.manual_seed(0)
    model = zoo.resnet18_cifar(width=width)
    if which != "torch":
        model = bn.convert(model)
    x, y = zoo.example_input(batch=8), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(net):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    step(model)
    step(model)
    compiled = torch.compile(model)
    t = time.perf_counter()
    step(compiled)
    first = time.perf_counter() - t
    t = time.perf_counter()
    step(compiled)
    second = time.perf_counter() - t
    print(compile_times(repr="str", aggregate=True), file=sys.stderr)
    print(json.dumps({
        "which": which, "width": width, "first_step_s": round(first, 1), "next_step_s": round(second, 4),
        "graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
    }))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ours", int(sys.argv[2]) if len(sys.argv) > 2 else 16)
