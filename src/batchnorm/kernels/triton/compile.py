"""Ahead-of-time compilation of every Triton kernel at every specialization the dispatch can request.

``python -m batchnorm.kernels.triton compile --arch sm_80 sm_90`` needs no GPU and no driver:

1. **Enumerate.** The backend's own entry points (:class:`~batchnorm.kernels.triton.backend.TritonBackend`: every
   primitive and fused sequence, plain, masked, ghost, ``momentum=None``, fused activation, ``memory="save"``,
   batch renorm with float and tensor limits, SyncBatchNorm's sequences, eval, the guard of native's GPU route) run on empty CPU tensors over a table of layouts (NCHW,
   channels-last with C ≤ 16 and C > 16, ``(N, C)``) and dtypes (float32, float16, bfloat16, float64) with the
   launches *recorded* instead of run (``backend._record``). Each recorded launch goes through the kernel's own
   argument binder (triton's, for the CUDA backend), so the specialization is exactly the one the JIT would
   build for that call: constexpr modes and tile sizes, pointer dtypes and 16-byte alignment, strides equal
   to 1. Sizes and runtime flags are never specialized (:func:`batchnorm.kernels.triton.kernels._kernel`).
2. **Compile** each distinct specialization with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
   for each ``--arch``; shared memory is ``metadata.shared``.
3. **Measure** registers and spill bytes with triton's bundled ``ptxas -v`` on the PTX
   (``--gpu-name sm_80`` / ``sm_90a``, the target the PTX names).

It prints one row per (kernel, specialization, arch) and a summary, and exits with status 1 if any compile
fails or any kernel spills. Calls whose stride pattern is not in the table (other broadcast masks, odd views)
compile at first use in the same way; the table covers the layouts the layers produce.

Shape: not applicable. Example::

    $ python -m batchnorm.kernels.triton compile --arch sm_80 sm_90 --markdown
    $ python -m batchnorm.kernels.triton compile --arch sm_90 --kernels apply --dtypes float32   # a quick subset

Reference: triton's ``compiler.ASTSource`` / ``GPUTarget``; NVIDIA ``ptxas`` (``-v`` resource usage).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
#: name → (shape, memory format); the feature axis is 1
LAYOUTS = {
    "NCHW": ((8, 24, 6, 6), torch.contiguous_format),
    "NHWC-C16": ((8, 4, 6, 6), torch.channels_last),
    "NHWC": ((8, 24, 6, 6), torch.channels_last),
    "NC-C16": ((32, 4), torch.contiguous_format),
    "NC": ((32, 24), torch.contiguous_format),
}
ARCHS = {"sm_80": (80, "sm_80"), "sm_86": (86, "sm_86"), "sm_89": (89, "sm_89"), "sm_90": (90, "sm_90a")}


@dataclass
class Spec:
    kernel: object
    name: str
    label: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: tuple


def _calls(dtype: torch.dtype, layout: str):
    """Run every entry point of the backend once per variant on empty tensors (launches are recorded)."""
    from ..backend import Settings
    from .backend import TRITON

    shape, fmt = LAYOUTS[layout]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    c = shape[1]

    def e(*sz, dt=pd):
        return torch.empty(sz, dtype=dt)

    x = torch.empty(shape, dtype=dtype).to(memory_format=fmt) if len(shape) == 4 else torch.empty(shape, dtype=dtype)
    dy = torch.empty_like(x)
    mask = torch.ones((shape[0], *shape[2:]), dtype=torch.bool).unsqueeze(1)
    w, b = e(c), e(c)
    nbt = torch.zeros((), dtype=torch.long)
    for group in (None, 2):
        for m in (None, mask):
            for act in (None, "relu", "leaky_relu"):
                for save in (False, True):
                    if save and act == "relu":
                        continue
                    s = Settings(axis=1, group_size=group, activation=act, save=save)
                    for running in (None, (e(c), e(c), nbt, 0.1), (e(c), e(c), nbt, None)):
                        for affine in (True, False):
                            ww, bb = (w, b) if affine else (None, None)
                            y, stats, invstd, _ = TRITON.train_forward(x, s, m, ww, bb, running)
                            t = y if save else x
                            count = stats[0][:, :1] if save else None
                            TRITON.train_backward(dy, t, s, None if save else stats, invstd, ww, bb, count, m,
                                                  (True, True, True))
                    # float limits (the layer's, warm-up ramp in the kernel), tensor limits; BatchRenorm(momentum=None)
                    for limits, mom in (((3.0, 5.0), 0.01), ((3.0, 5.0), None),
                                        ((torch.full((), 3.0), torch.full((), 5.0)), 0.01)):
                        y, stats, invstd, rd, _ = TRITON.renorm_forward(x, s, m, w, b, e(c), e(c), *limits,
                                                                        (e(c), e(c), nbt, mom), warmup=100)
                        t = y if save else x
                        count = stats[0][:, :1] if save else None
                        TRITON.renorm_backward(dy, t, s, None if save else stats, invstd, w, b, count, m,
                                               (True, True, True), rd)
            if group is None:  # SyncBatchNorm's sequences (no ghost groups), around a stand-in for the all-gather
                def gather(msg):
                    return msg.new_empty(2 * msg.numel()).view(2, -1)

                for save in (False, True):
                    s = Settings(axis=1, activation="leaky_relu" if save else None, save=save)
                    for mom in (0.1, None):
                        rec = e(2 + 2 * 6, dt=torch.float64)
                        y, stats, invstd, _, back = TRITON.sync_forward(x, s, m, w, b, (e(c), e(c), nbt, mom),
                                                                        (1, 0, 3, 8), gather, rec, False, True)
                        t = y if save else x
                        count = stats[0][:, :1] if save else None
                        TRITON.sync_backward(dy, t, s, None if save else stats, invstd, w, b, count, m,
                                             (True, True, True), back, gather, rec, False)
            # the primitives, as the composed sequences call them
            s = Settings(axis=1, group_size=group)
            cnt, mean, m2 = TRITON.reduce(x, s, m)
            g = cnt.shape[0]
            TRITON.apply(x, s, e(g, c), e(g, c))
            TRITON.backward_reduce(dy, x, s, mean, e(g, c), e(1, c), e(1, c))
            TRITON.backward_apply(dy, x, s, mean, e(g, c), e(g, c), e(g, c), e(g, c), m, e(1, c), e(1, c))
            TRITON.update_running(e(c), e(c), mean, m2, cnt, 0.1, nbt)
            TRITON.update_running(e(c), e(c), mean, m2, cnt, None, nbt)
    # native's GPU route: cuDNN's batch mean and 1/σ (float32; float64 for float64 input) update the buffers, float32
    # ones or (a layer made .half()/.bfloat16()) buffers of the input's dtype
    for buffers in dict.fromkeys((pd, dtype)):
        for momentum in (0.1, None):
            TRITON.update_from_invstd(e(c, dt=buffers), e(c, dt=buffers), nbt, e(c), e(c), 8, momentum, 1e-5)
    for act in (None, "relu"):
        for affine in (True, False):
            with torch.no_grad():
                TRITON.eval_forward(x, Settings(axis=1, activation=act), w if affine else None, b if affine else None,
                                    e(c), e(c))


def specializations(dtypes=None, layouts=None, kernels=None) -> list[Spec]:
    """The distinct (kernel, specialization) pairs the dispatch can request, in first-seen order."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature

    from . import backend as B

    if B.interpreting():
        raise RuntimeError("the compile command needs the compiling kernels: unset TRITON_INTERPRET and run it again.")
    be = CUDABackend(GPUTarget("cuda", 90, 32))
    specs: dict[tuple, Spec] = {}
    for dname in dtypes or DTYPES:
        for lname in layouts or LAYOUTS:
            B._record = []
            try:
                _calls(DTYPES[dname], lname)
                recorded = B._record
            finally:
                B._record = None
            for kernel, args, meta in recorded:
                name = kernel.fn.__name__
                if kernels and name not in kernels:
                    continue
                binder = create_function_from_signature(kernel.signature, kernel.params, be)
                bound, spec, opts = binder(*args, **meta)
                options, sig, cx, attrs = kernel._pack_args(be, dict(meta), bound, spec, opts)
                key = (name, tuple(sig.items()), tuple(sorted(cx.items())), tuple(sorted((k, str(v)) for k, v in
                                                                                         attrs.items())))
                if key in specs:
                    continue
                names = list(kernel.signature.parameters)
                ptrs = [sig[n] for n in names if sig[n].startswith("*")]
                ones = [names[p[0]] for p, v in cx.items() if names[p[0]] not in meta and v == 1]
                modes = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items()
                         if k not in ("F64",) and k.isupper()]  # the constexpr modes (not finalize's sync operands)
                label = f"{ptrs[0][1:]} {lname}: " + " ".join(modes) + (f" [=1: {','.join(ones)}]" if ones else "")
                specs[key] = Spec(kernel, name, label, sig, cx, attrs, options.__dict__, key)
    return list(specs.values())


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_REG = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(spec: Spec, arch: str) -> dict:
    """Compile one specialization for ``arch``; registers and spills from ptxas, shared memory from triton."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc, gpu_name = ARCHS[arch]
    row = {"kernel": spec.name, "spec": spec.label, "arch": arch, "regs": None, "spill": None, "shared": None,
           "error": None}
    try:
        src = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(spec.options))
        row["shared"] = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(compiled.asm["ptx"])
            out = subprocess.run([_ptxas(), "-v", "--gpu-name", gpu_name, path, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed: {text.strip()[-400:]}")
        regs, spill = _REG.search(text), _SPILL.search(text)
        row["regs"] = int(regs.group(1)) if regs else 0
        row["spill"] = int(spill.group(1)) + int(spill.group(2)) if spill else 0
    except Exception as e:  # noqa: BLE001 - reported in the table; the command exits non-zero
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
    return row


_SPECS: list[Spec] = []


def _work(job):
    i, arch = job
    return compile_one(_SPECS[i], arch)


def run(archs, dtypes=None, layouts=None, kernels=None, jobs=1, markdown=False, out=sys.stdout) -> int:
    """Compile everything, print the table and a summary; return the exit status (0 ok, 1 failure or spill)."""
    global _SPECS
    t0 = time.perf_counter()
    _SPECS = specializations(dtypes, layouts, kernels)
    work = [(i, a) for i in range(len(_SPECS)) for a in archs]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_work, work, chunksize=1)
    else:
        rows = [_work(j) for j in work]
    header = ("kernel", "specialization", "arch", "registers", "spill bytes", "shared bytes")
    if markdown:
        print("| " + " | ".join(header) + " |", file=out)
        print("|" + "---|" * len(header), file=out)
    else:
        print("  ".join(header), file=out)
    for r in rows:
        cells = (r["kernel"], r["spec"], r["arch"], *(("FAILED", r["error"], "") if r["error"] else
                                                      (str(r["regs"]), str(r["spill"]), str(r["shared"]))))
        print(("| " + " | ".join(cells) + " |") if markdown else "  ".join(cells), file=out)
    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if not r["error"] and r["spill"]]
    ok = [r for r in rows if not r["error"]]
    print(file=out)
    print(f"{len(_SPECS)} specializations x {len(archs)} arch(s) = {len(rows)} compiles in "
          f"{time.perf_counter() - t0:.0f} s: {len(failed)} failed, {len(spilled)} spilled", file=out)
    for arch in archs:
        per = [r for r in ok if r["arch"] == arch]
        for name in dict.fromkeys(r["kernel"] for r in per):
            k = [r for r in per if r["kernel"] == name]
            print(f"  {arch} {name}: {len(k)} variants, registers {min(r['regs'] for r in k)}-"
                  f"{max(r['regs'] for r in k)}, spill {max(r['spill'] for r in k)} B, shared "
                  f"{max(r['shared'] for r in k)} B", file=out)
    return 1 if failed or spilled else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m batchnorm.kernels.triton",
                                description="Compile the triton backend's kernels ahead of time (no GPU needed).")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile every kernel at every specialization; table of registers, spills, "
                                       "shared memory; exit 1 on any failure or spill")
    c.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(ARCHS))
    c.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="only these input dtypes (default: all)")
    c.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), help="only these layouts (default: all)")
    c.add_argument("--kernels", nargs="+", help="only these kernels (default: all)")
    c.add_argument("--jobs", type=int, default=1, help="parallel compile processes (default 1)")
    c.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    a = p.parse_args(argv)
    return run(a.arch, a.dtypes, a.layouts, a.kernels, max(1, a.jobs), a.markdown)
