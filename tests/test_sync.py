"""SyncBatchNorm on torch.distributed (gloo, CPU, localhost) against one process on the concatenated batch.

Every multi-process test spawns fresh processes with a bounded join; stragglers are killed. Each
rank writes its results with torch.save; the parent compares them with a single-process reference.
"""

from __future__ import annotations

import os
import re
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm import BatchNorm, SyncBatchNorm

gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

FEATURES = 4
LENGTH = 6
# per step, the batch size of each rank (sum over ranks = the concatenated batch of the reference)
CASES = {
    2: [(3, 6), (5, 0)],
    3: [(4, 0, 7), (2, 3, 1)],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net(seed: int = 1, bn=SyncBatchNorm) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(2, FEATURES, 3, padding=1),
        bn(FEATURES),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(FEATURES * LENGTH, 3),
    ).double()


def _step_data(step: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(total, 2, LENGTH, generator=g, dtype=torch.float64) * 3 + 1
    w = torch.randn(total, 3, generator=g, dtype=torch.float64)  # loss = Σ (out · w)
    return x, w


def _entry(rank: int, world: int, port: int, outdir: str, scenario: str) -> None:
    """Spawned process body: init gloo, run the scenario, save results or the traceback."""
    torch.set_num_threads(1)  # several processes share two cores
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=5),
        )
        result = globals()[scenario](rank, world)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise


def _scenario_parity(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_net())
    out: dict = {"steps": []}
    for step, sizes in enumerate(CASES[world]):
        x, w = _step_data(step, sum(sizes))
        lo = sum(sizes[:rank])
        xr = x[lo : lo + sizes[rank]].clone().requires_grad_(True)
        model.zero_grad()
        y = model(xr)
        (y * w[lo : lo + sizes[rank]]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        out["steps"].append({"y": y.detach(), "dx": xr.grad.clone(), "grads": grads})
    bn = model.module[1]
    out["running"] = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    # precise BN across processes: every rank recalibrates on its own shards, all get the global population
    shards = []
    for step, sizes in enumerate(CASES[world]):
        x, _ = _step_data(step, sum(sizes))
        lo = sum(sizes[:rank])
        shards.append(x[lo : lo + sizes[rank]])
    batchnorm.recalibrate(model.module, shards, progress=False)
    out["recalibrated"] = (bn.running_mean.clone(), bn.running_var.clone())
    # options and masks go through the same path: channels-last, fused activation, memory="save", a padding mask
    sizes = CASES[world][0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), 5, 3, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(sum(sizes), 5, 3, generator=g, dtype=torch.float64)
    mask = torch.arange(5) < torch.randint(1, 6, (sum(sizes), 1), generator=g)
    opts = {"axis": -1, "activation": "leaky_relu", "negative_slope": 0.2, "memory": "save"}
    sync, single = SyncBatchNorm(3, **opts).double(), BatchNorm(3, **opts).double()
    with torch.no_grad():
        sync.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        single.weight.copy_(sync.weight)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    xr = x[lo:hi].clone().requires_grad_(True)
    y = sync(xr, mask=mask[lo:hi])
    (y * dy[lo:hi]).sum().backward()
    xa = x.clone().requires_grad_(True)
    ya = single(xa, mask=mask)
    (ya * dy).sum().backward()
    wgrad = sync.weight.grad.clone()
    dist.all_reduce(wgrad)
    out["options_diff"] = max(
        float((y - ya[lo:hi]).abs().max()) if hi > lo else 0.0,
        float((xr.grad - xa.grad[lo:hi]).abs().max()) if hi > lo else 0.0,
        float((wgrad - single.weight.grad).abs().max()),
        float((sync.running_var - single.running_var).abs().max()),
        float((sync.running_mean - single.running_mean).abs().max()),
    )
    # the batch-size check counts globally: one value in total across the group is an error on every rank
    layer = SyncBatchNorm(FEATURES).double()
    try:
        layer(torch.randn(1 if rank == 0 else 0, FEATURES, dtype=torch.float64))
        out["error"] = None
    except ValueError as err:
        out["error"] = str(err)
    # eval mode: running statistics only, no collective (rank 1 skips it: a collective would hang)
    if rank == 0:
        layer.eval()
        out["eval_ok"] = bool(torch.isfinite(layer(torch.randn(2, FEATURES, dtype=torch.float64))).all())
    return out


def _scenario_death(rank: int, world: int) -> dict:
    layer = SyncBatchNorm(FEATURES)
    layer(torch.randn(8, FEATURES))  # one good step: the ranks' agreement check is behind us
    dist.barrier()
    if rank == 1:
        time.sleep(1.0)  # let rank 0 enter the all_gather first: the peer dies while it waits
        os._exit(3)
    start = time.monotonic()
    try:
        layer(torch.randn(8, FEATURES))
        return {"error": None, "elapsed": time.monotonic() - start}
    except RuntimeError as err:
        return {"error": str(err), "elapsed": time.monotonic() - start}


def _scenario_mismatch(rank: int, world: int, variant: str) -> dict:
    """Ranks disagree on features or dtype; every rank must raise (no SIGABRT) and the group stays usable."""
    from batchnorm.layers.sync import ProcessGroupMismatchError

    calls = {"all_gather": 0}
    names = ("all_gather", "all_gather_single", "all_gather_into_tensor")
    real = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counting(fn):
        def wrapped(*args, **kwargs):
            calls["all_gather"] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name, fn in real.items():
        setattr(dist, name, counting(fn))
    features = {"features": (4, 6)}.get(variant, (4, 4))[rank]
    dtypes = {"dtype": (torch.float32, torch.float64)}.get(variant, (torch.float32, torch.float32))
    layer = SyncBatchNorm(features)
    out: dict = {"errors": [], "steps_ok": 0}
    for step in range(3):
        dtype = dtypes[rank]
        if variant == "dtype_later" and step == 2 and rank == 1:
            dtype = torch.float64  # agreed twice, then one rank changes its input dtype
        x = torch.randn(5, features, 3, dtype=dtype, requires_grad=True)
        try:
            layer(x).pow(2).sum().backward()
            out["steps_ok"] += 1
        except ProcessGroupMismatchError as err:
            out["errors"].append((step, str(err), isinstance(err, RuntimeError), isinstance(err, ValueError)))
            break
    out["all_gather_calls"] = calls["all_gather"]
    for name, fn in real.items():
        setattr(dist, name, fn)
    flag = torch.ones(1)
    dist.all_reduce(flag)  # the group still works after the error
    out["alive"] = float(flag)
    return out


def _scenario_mismatch_features(rank: int, world: int) -> dict:
    return _scenario_mismatch(rank, world, "features")


def _scenario_mismatch_dtype(rank: int, world: int) -> dict:
    return _scenario_mismatch(rank, world, "dtype")


def _scenario_mismatch_dtype_later(rank: int, world: int) -> dict:
    return _scenario_mismatch(rank, world, "dtype_later")


def _scenario_mismatch_none(rank: int, world: int) -> dict:
    return _scenario_mismatch(rank, world, "none")


HOST_READS = ("aten._local_scalar_dense.default", "aten.nonzero.default", "aten.lift_fresh.default",
              "aten.lift_fresh_copy.default")


class _HostReads(TorchDispatchMode):
    """Counts the ATen calls that make a GPU's host wait (a scalar read, nonzero) or copy host data to the device."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _out_of_step(rank: int, layer: SyncBatchNorm, steps: int, skew) -> list:
    """Train ``layer`` for ``steps`` steps with ``skew(rank, step, layer)`` run before each; the errors raised."""
    from batchnorm.layers.sync import ProcessGroupMismatchError

    errors = []
    for step in range(steps):
        phase = "skew"
        try:
            skew(rank, step, layer)
            phase = "forward"
            y = layer(torch.randn(6, FEATURES, 3, dtype=torch.float64, requires_grad=True))
            phase = "backward"
            y.pow(2).sum().backward()
        except ProcessGroupMismatchError as err:
            errors.append((step, phase, str(err)))
            break
    dist.barrier()  # both ranks raised at the same collective: nothing is left to pair
    return errors


def _eval_step_on_rank1(rank, step, layer):
    if rank == 1 and step == 1:  # a training step with the layer in eval mode: no collective, but a step
        layer.eval()
        layer(torch.randn(6, FEATURES, 3, dtype=torch.float64, requires_grad=True)).pow(2).sum().backward()
        layer.train()


def _extra_forward_on_rank0(rank, step, layer):
    if rank == 0 and step == 1:
        layer(torch.randn(6, FEATURES, 3, dtype=torch.float64))  # a training-mode forward without backward


def _scenario_out_of_step(rank: int, world: int) -> dict:
    """Ranks out of step raise on every rank: on the CPU at the collective, on the GPU route one call later."""
    out: dict = {}
    out["eval"] = _out_of_step(rank, SyncBatchNorm(FEATURES).double(), 4, _eval_step_on_rank1)
    out["extra"] = _out_of_step(rank, SyncBatchNorm(FEATURES).double(), 4, _extra_forward_on_rank0)
    # the GPU route with CPU tensors: the one device check says "cuda" (select, the layers, the combine)
    from batchnorm.kernels import dispatch

    dispatch.device_type = lambda x: "cuda"
    sync = SyncBatchNorm(FEATURES, backend="composite").double()
    single = BatchNorm(FEATURES, backend="composite").double()
    out["reads"], out["diff"] = [], 0.0
    for step, sizes in enumerate([(5, 3), (5, 0), (2, 7), (4, 4)]):  # uneven and empty ranks
        g = torch.Generator().manual_seed(step)
        x = torch.randn(sum(sizes), FEATURES, 3, generator=g, dtype=torch.float64) * 2 + 3
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        xr, xa = x[lo:hi].clone().requires_grad_(True), x.clone().requires_grad_(True)
        with _HostReads() as reads:
            y = sync(xr)
            y.pow(2).sum().backward()
        if step:  # the first step checks the feature count once (a host read) and caches the header constants
            out["reads"].append(reads.seen)
        ya = single(xa)
        ya.pow(2).sum().backward()  # the sum of every rank's loss: what the synchronized backward differentiates
        ref_dx = xa.grad[lo:hi]
        out["diff"] = max(out["diff"], float((y - ya[lo:hi]).detach().abs().max()) if hi > lo else 0.0,
                          float((sync.running_var - single.running_var).abs().max()))
        out["dx"] = (xr.grad, ref_dx)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the refused (NaN) batch warns
        out["gpu"] = _out_of_step(rank, sync, 4, _eval_step_on_rank1)
    out["tracked"] = int(sync.num_batches_tracked)
    out["running_finite"] = bool(torch.isfinite(sync.running_mean).all() and torch.isfinite(sync.running_var).all())
    return out


def _scenario_triton_route(rank: int, world: int) -> dict:
    """The GPU route's fused sync sequences (triton, run by its CPU interpreter) against one process on the
    concatenated batch, with uneven and empty ranks, a mask and memory="save"; then ranks out of step."""
    import warnings

    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported in this process
    from batchnorm.kernels import dispatch
    from batchnorm.kernels.triton import backend as tb

    real_device_type = dispatch.device_type
    dispatch.device_type = lambda x: "cuda"
    out: dict = {"diff": 0.0, "launches": []}

    def both(**opts):  # momentum and the slope below are exact in float32, as the interpreter passes float scalars
        sync, single = SyncBatchNorm(3, momentum=0.25, **opts).double(), BatchNorm(3, momentum=0.25, **opts).double()
        single.backend = "composite"
        with torch.no_grad():
            sync.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            sync.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            single.load_state_dict(sync.state_dict())
        return sync, single

    def step(sync, single, sizes, seed, masked=False, shape=(3, 4)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64) * 2 + 3
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        mask = None
        if masked:
            rest = tuple(s for d, s in enumerate(x.shape) if d != (1 if shape[0] == 3 else x.dim() - 1))
            mask = torch.rand(rest, generator=g) > 0.3
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        xr, xa = x[lo:hi].clone().requires_grad_(True), x.clone().requires_grad_(True)
        before = tb.launch_count()
        y = sync(xr) if mask is None else sync(xr, mask=mask[lo:hi])
        (y * dy[lo:hi]).sum().backward()
        out["launches"].append((hi - lo, tb.launch_count() - before))
        ya = single(xa) if mask is None else single(xa, mask=mask)
        (ya * dy).sum().backward()  # the sum of every rank's loss: what the synchronized backward differentiates
        grads = torch.cat([sync.weight.grad, sync.bias.grad])
        dist.all_reduce(grads)  # parameter gradients stay local: their sum over ranks is the single process's
        diffs = [(grads - torch.cat([single.weight.grad, single.bias.grad])).abs().max(),
                 (sync.running_mean - single.running_mean).abs().max(),
                 (sync.running_var - single.running_var).abs().max()]
        if hi > lo:
            diffs += [(y - ya[lo:hi]).detach().abs().max(), (xr.grad - xa.grad[lo:hi]).abs().max()]
        out["diff"] = max(out["diff"], *(float(d) for d in diffs))
        out["tracked"] = (int(sync.num_batches_tracked), int(single.num_batches_tracked))
        for p in (*sync.parameters(), *single.parameters()):
            p.grad = None

    sync, single = both()
    for k, sizes in enumerate([(5, 3), (5, 0), (2, 7), (0, 4), (1, 1)]):  # uneven and empty ranks
        step(sync, single, sizes, k)
    step(sync, single, (4, 3), 10, masked=True)
    sync, single = both(axis=-1, activation="leaky_relu", negative_slope=0.25, memory="save")
    for k, sizes in enumerate([(3, 5), (6, 0)]):
        step(sync, single, sizes, 20 + k, masked=k == 0, shape=(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the refused (NaN) batch warns; NumPy's inf − inf
        # found on the device: NaN statistics, raised at the next call (the backward)
        out["gpu"] = _out_of_step(rank, SyncBatchNorm(FEATURES).double(), 4, _eval_step_on_rank1)
        # backend="triton" with CPU tensors on the CPU route: the host reads the record and raises at the collective
        dispatch.device_type = real_device_type
        forced = SyncBatchNorm(FEATURES, backend="triton").double()
        before = tb.launch_count()
        forced(torch.randn(6, FEATURES, 3, dtype=torch.float64, requires_grad=True)).pow(2).sum().backward()
        out["forced_launches"] = tb.launch_count() - before
        out["cpu"] = _out_of_step(rank, forced, 4, _eval_step_on_rank1)
        out["cpu_extra"] = _out_of_step(rank, SyncBatchNorm(FEATURES, backend="triton").double(), 4,
                                        _extra_forward_on_rank0)
    out["cpu_running_finite"] = bool(torch.isfinite(forced.running_var).all())
    out["cpu_tracked"] = int(forced.num_batches_tracked)
    return out


def _launch(world: int, scenario: str, tmp_path, timeout: float = 120.0) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, str(tmp_path), scenario)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(5)
    assert not hung, f"{len(hung)} process(es) still running after {timeout} s: a collective hung"
    results = {}
    for r in range(world):
        path = tmp_path / f"rank{r}.pt"
        if path.exists():
            results[r] = torch.load(path, weights_only=False)
        elif (tmp_path / f"rank{r}.err").exists():
            results[r] = {"traceback": (tmp_path / f"rank{r}.err").read_text()}
        else:
            results[r] = {"traceback": f"rank {r} wrote nothing (exit code {procs[r].exitcode})"}
        results[r]["exitcode"] = procs[r].exitcode
    return results


def _reference(world: int) -> dict:
    model = _net(bn=BatchNorm)
    steps = []
    for step, sizes in enumerate(CASES[world]):
        x, w = _step_data(step, sum(sizes))
        x = x.clone().requires_grad_(True)
        model.zero_grad()
        y = model(x)
        (y * w).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad.clone(),
                      "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
    bn = model[1]
    ref = {"steps": steps, "running": (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())}
    # the population of the BN inputs of all batches: the train-mode BN input is the conv output
    with torch.no_grad():
        h = torch.cat([model[0](_step_data(s, sum(z))[0]) for s, z in enumerate(CASES[world])])
    ref["recalibrated"] = (h.mean((0, 2)), h.transpose(0, 1).reshape(FEATURES, -1).var(1))
    return ref


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sync_equals_single_process_on_concatenated_batch(world, tmp_path):
    results = _launch(world, "_scenario_parity", tmp_path)
    for r in range(world):
        assert "traceback" not in results.get(r, {}), results.get(r, {}).get("traceback", f"rank {r} wrote nothing")
    ref = _reference(world)
    tol = {"rtol": 1e-5, "atol": 1e-8}
    for step in range(len(CASES[world])):
        want = ref["steps"][step]
        y = torch.cat([results[r]["steps"][step]["y"] for r in range(world)])
        dx = torch.cat([results[r]["steps"][step]["dx"] for r in range(world)])
        torch.testing.assert_close(y, want["y"], **tol)
        torch.testing.assert_close(dx, want["dx"], **tol)
        for name, g in want["grads"].items():
            for r in range(world):
                # DDP averages the per-rank gradients; the reference sums over the whole batch
                torch.testing.assert_close(results[r]["steps"][step]["grads"][name] * world, g, **tol)
    for r in range(world):
        rm, rv, nbt = results[r]["running"]
        torch.testing.assert_close(rm, ref["running"][0], **tol)
        torch.testing.assert_close(rv, ref["running"][1], **tol)
        assert int(nbt) == int(ref["running"][2]) == len(CASES[world])
        torch.testing.assert_close(results[r]["recalibrated"][0], ref["recalibrated"][0], **tol)
        torch.testing.assert_close(results[r]["recalibrated"][1], ref["recalibrated"][1], **tol)
        assert results[r]["error"] is not None and "got 1 for input of shape" in results[r]["error"]
        assert f"summed over the {world} processes" in results[r]["error"]
    assert results[0]["eval_ok"]
    for r in range(world):
        assert results[r]["options_diff"] < 1e-10


@gloo
@pytest.mark.slow
def test_dead_process_makes_the_others_fail_clearly(tmp_path):
    results = _launch(2, "_scenario_death", tmp_path)
    assert 0 in results and "traceback" not in results[0], results.get(0)
    err = results[0]["error"]
    assert err is not None, "the surviving process finished a collective with a dead peer"
    assert "SyncBatchNorm: the all_gather of batch statistics across the 2 processes" in err
    assert "init_process_group(timeout=...)" in err
    assert results[0]["elapsed"] < 5 + 20  # the configured 5 s timeout, plus slack for a loaded machine


# scenario -> (step at which every rank raises or None, words in the message, all_gather calls per rank)
MISMATCH_CASES = {
    # one fixed-size handshake gather, then it raises before the size-dependent statistics gather
    "_scenario_mismatch_features": (0, ["feature counts", "rank 0: 4 features, float32", "rank 1: 6 features, float32"], 1),
    "_scenario_mismatch_dtype": (0, ["input dtypes", "rank 0: 4 features, float32", "rank 1: 4 features, float64"], 1),
    # handshake once + a forward and a backward gather per step; step 2's forward gather carries the new dtype
    "_scenario_mismatch_dtype_later": (2, ["input dtypes", "rank 1: 4 features, float64"], 1 + 2 * 2 + 1),
    # agreement is checked once per layer, not per step: 1 handshake + 3 forward and 3 backward gathers
    "_scenario_mismatch_none": (None, [], 1 + 3 * 2),
}


@gloo
@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(MISMATCH_CASES))
def test_ranks_that_disagree_raise_on_every_rank_instead_of_aborting(scenario, tmp_path):
    step, words, gathers = MISMATCH_CASES[scenario]
    results = _launch(2, scenario, tmp_path, timeout=90.0)
    for r in range(2):
        res = results[r]
        assert "traceback" not in res, res["traceback"]  # an abort (SIGABRT in gloo) leaves no result
        assert res["exitcode"] == 0 and res["alive"] == 2.0
        assert res["all_gather_calls"] == gathers
        if step is None:
            assert res["errors"] == [] and res["steps_ok"] == 3
            continue
        (at, msg, is_runtime, is_value), = res["errors"]
        assert at == step and res["steps_ok"] == step and is_runtime and is_value
        assert msg.startswith("SyncBatchNorm: the 2 processes of the process group disagree on the")
        for word in words + ["same num_features", "no collective was run with mismatched sizes"]:
            assert word in msg, (word, msg)


@pytest.mark.parametrize(
    "shape, axis, mask",
    [((6, 3), 1, None), ((4, 3, 5), 1, None), ((4, 5, 3), -1, "mask"), ((0, 3, 2), 1, None)],
)
def test_without_process_group_it_is_batchnorm(shape, axis, mask):
    assert not dist.is_initialized()
    x = torch.randn(shape)
    m = (torch.arange(5) < torch.tensor([5, 2, 4, 1])[:, None]) if mask else None
    ours, plain = SyncBatchNorm(3, axis=axis), BatchNorm(3, axis=axis)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = ours(x1, mask=m), plain(x2, mask=m)
    assert torch.equal(y1, y2)
    if x.numel():
        y1.pow(2).sum().backward()
        y2.pow(2).sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(ours.weight.grad, plain.weight.grad)
    assert torch.equal(ours.running_mean, plain.running_mean)
    assert torch.equal(ours.running_var, plain.running_var)
    assert int(ours.num_batches_tracked) == int(plain.num_batches_tracked)


@gloo
def test_group_of_one_process_is_batchnorm():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, timeout=timedelta(seconds=10)
    )
    try:
        x = torch.randn(5, 3, 4)
        ours, plain = SyncBatchNorm(3), BatchNorm(3)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = ours(x1), plain(x2)
        y1.pow(3).sum().backward()
        y2.pow(3).sum().backward()
        assert torch.equal(y1, y2) and torch.equal(x1.grad, x2.grad)
        assert torch.equal(ours.running_var, plain.running_var)
        assert type(ours._combine()) is batchnorm.functional.Combine  # no collective at all
    finally:
        dist.destroy_process_group()
    assert not dist.is_initialized()


def test_without_process_group_errors_like_batchnorm():
    with pytest.raises(ValueError, match=r"SyncBatchNorm expected more than 1 value per feature when training, got 1"):
        SyncBatchNorm(3)(torch.randn(1, 3))


def test_convert_to_sync_and_back_keeps_state():
    model = _net(bn=nn.BatchNorm1d)
    model(torch.randn(8, 2, LENGTH, dtype=torch.float64))
    sync = batchnorm.convert(model, to=SyncBatchNorm, process_group=None)
    assert isinstance(sync[1], SyncBatchNorm) and sync[1].process_group is None
    back = batchnorm.convert(sync, to=nn.BatchNorm1d)
    torch_spelling = SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(torch_spelling[1], SyncBatchNorm) and isinstance(model[1], nn.BatchNorm1d)
    x = torch.randn(5, 2, LENGTH, dtype=torch.float64)
    for m in (model, sync, back):
        m.eval()
    torch.testing.assert_close(sync(x), model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back(x), model(x), rtol=1e-12, atol=1e-12)


@gloo
@pytest.mark.slow
def test_out_of_step_ranks_raise_on_every_rank(tmp_path):
    """Rank 1 runs one step in eval mode, or rank 0 one extra forward: every rank raises, naming layer and steps."""
    results = _launch(2, "_scenario_out_of_step", tmp_path, timeout=100.0)
    for r in range(2):
        assert "traceback" not in results[r], results[r]["traceback"]
    # CPU: at the collective itself. Rank 0's 2nd forward met rank 1's 3rd (its eval step counted, no collective)
    (s0, p0, m0), = results[0]["eval"]
    (s1, p1, m1), = results[1]["eval"]
    assert (s0, p0, s1, p1) == (1, "forward", 1, "forward")  # rank 1: the training forward after its eval step
    for msg in (m0, m1):
        assert "processes of the process group are out of step" in msg
        assert re.search(r"rank 0: layer #(\d+), step 2 \(forward statistics\); rank 1: layer #\1, step 3 "
                         r"\(forward statistics\)", msg), msg
        assert "Nothing was merged" in msg and "torch.no_grad()" in msg
    # an extra forward on rank 0: its next forward meets rank 1's backward (same size, different header)
    (s0, p0, m0), = results[0]["extra"]
    (s1, p1, m1), = results[1]["extra"]
    assert (s0, p0, s1, p1) == (1, "forward", 1, "backward")
    for msg in (m0, m1):
        assert re.search(r"rank 0: layer #\d+, step 3 \(forward statistics\); rank 1: layer #\d+, step 2 "
                         r"\(backward sums\)", msg), msg
    for r in range(2):
        res = results[r]
        # the GPU route: same numbers as one process on the concatenated batch, with uneven and empty ranks
        assert res["diff"] < 1e-10
        torch.testing.assert_close(*res["dx"], rtol=1e-8, atol=1e-10)
        # no scalar read, nonzero or host-data copy on a step, inside the layer and its combine
        assert res["reads"] == [[], [], []], res["reads"]
        # a mismatch found on the device: NaN statistics (refused by the guard), raised at the next call
        (step, phase, msg), = res["gpu"]
        assert (step, phase) == (1, "backward")
        assert "set to NaN on the device" in msg
        # four steps in step before: rank 0's 6th forward met rank 1's 7th
        assert "rank 0: layer #" in msg and re.search(r"step 6 \(forward statistics\); rank 1: layer #\d+, step 7 "
                                                     r"\(forward statistics\)", msg), msg
        assert res["running_finite"] and res["tracked"] == 4 + 1  # 4 steps, then 1 before the refused one


@gloo
@pytest.mark.slow
def test_triton_route_equals_single_process_and_catches_ranks_out_of_step(tmp_path):
    """SyncBatchNorm's fused triton sequences on two gloo ranks (CPU tensors, Triton's interpreter, the GPU route):
    3 + 3 launches per step on a rank with data (an empty rank takes the composed path with the same messages);
    outputs, input and parameter gradients, running statistics as one process on the concatenated batch; a fault
    found on the device is raised at the next call, and with backend="triton" on the CPU at the collective itself."""
    results = _launch(2, "_scenario_triton_route", tmp_path, timeout=240.0)
    for r in range(2):
        assert "traceback" not in results[r], results[r]["traceback"]
    for r in range(2):
        res = results[r]
        assert res["diff"] < 1e-7, res["diff"]
        assert res["tracked"][0] == res["tracked"][1] == 2
        assert all(n == 6 for rows, n in res["launches"] if rows), res["launches"]
        assert all(n == 0 for rows, n in res["launches"] if not rows), res["launches"]
        (step, phase, msg), = res["gpu"]
        assert (step, phase) == (1, "backward") and "set to NaN on the device" in msg
        assert re.search(r"rank 0: layer #(\d+), step 2 \(forward statistics\); rank 1: layer #\1, step 3", msg), msg
        assert res["forced_launches"] == 6
        (step, phase, msg), = res["cpu"]
        assert (step, phase) == (1, "forward") and "Nothing was merged" in msg, (step, phase, msg)
        assert res["cpu_running_finite"] and res["cpu_tracked"] == 1 + 1  # the step before, then one good step
    (s0, p0, m0), = results[0]["cpu_extra"]
    (s1, p1, m1), = results[1]["cpu_extra"]
    assert (s0, p0, s1, p1) == (1, "forward", 1, "backward")
    for msg in (m0, m1):
        assert re.search(r"rank 0: layer #\d+, step 3 \(forward statistics\); rank 1: layer #\d+, step 2 "
                         r"\(backward sums\)", msg), msg
