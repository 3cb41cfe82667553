"""Train a small 1-D CNN on MNIST-1D with DistributedDataParallel and synchronized batch norm.

    torchrun --nproc_per_node=2 examples/ddp_train.py [--epochs 5] [--batch-size 64] [--samples 5000]

Each process takes its own shard of the training set (``DistributedSampler``), the model's
BatchNorm layers become :class:`batchnorm.SyncBatchNorm` (``batchnorm.convert``), and DDP averages
the gradients. Gloo on CPU; with CUDA, pass ``--backend nccl`` (untested here).

Before training, a check: on one fixed batch split unevenly across the processes (the last
process gets an empty share when there are more than 2), the synchronized model must give the
outputs, input gradients and running statistics that a single process computes on the whole
batch with plain BatchNorm. Then, per epoch, every rank prints its own numbers (samples, loss,
the statistics of its local batch at the first BN layer) and rank 0 prints the global ones
(the synchronized statistics, all-reduced loss and accuracy, test accuracy, and how far the running
statistics differ between ranks — they should not).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import batchnorm
from batchnorm.lab.data import mnist1d


def make_model() -> nn.Module:
    """A plain torch CNN (torch.nn.BatchNorm1d inside), as a user would bring it."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(32, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(), nn.AdaptiveAvgPool1d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )


def small_mnist1d(n: int):
    """MNIST-1D with ``n`` samples (generation takes seconds per 1000), as ``batchnorm.lab.data.mnist1d``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = n
    d = make_dataset(args)  # procedural, never downloads
    f = lambda a: torch.as_tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    return f(d["x"]), torch.as_tensor(d["y"]).long(), f(d["x_test"]), torch.as_tensor(d["y_test"]).long()


def say(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", flush=True)


def sync_check(model: nn.Module, rank: int, world: int) -> None:
    """SyncBatchNorm on an uneven split == BatchNorm on the concatenated batch (one process)."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(23, 1, 40, generator=g, dtype=torch.float64) * 2 + 0.5
    w = torch.randn(23, 10, generator=g, dtype=torch.float64)
    sizes = [23 // world + (1 if r < 23 % world else 0) for r in range(world)]
    if world > 2:  # one empty rank: it must still take part in every collective
        sizes[0] += sizes[-1]
        sizes[-1] = 0
    else:
        sizes = [15, 8]
    lo = sum(sizes[:rank])
    synced = batchnorm.convert(copy.deepcopy(model).double(), to=batchnorm.SyncBatchNorm).train()
    xr = x[lo : lo + sizes[rank]].clone().requires_grad_(True)
    y = synced(xr)
    (y * w[lo : lo + sizes[rank]]).sum().backward()

    def gather(t: torch.Tensor) -> torch.Tensor:
        n = torch.tensor([t.shape[0]])
        ns = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(ns, n)
        pad = torch.zeros(max(int(k) for k in ns), *t.shape[1:], dtype=t.dtype)
        pad[: t.shape[0]] = t
        out = [torch.zeros_like(pad) for _ in range(world)]
        dist.all_gather(out, pad)
        return torch.cat([o[: int(k)] for o, k in zip(out, ns)])

    y_all, dx_all = gather(y.detach()), gather(xr.grad)
    bns = [m for m in synced.modules() if isinstance(m, batchnorm.SyncBatchNorm)]
    say(rank, f"sync check: local batch {sizes[rank]} of {sum(sizes)} (split {sizes})")
    if rank == 0:
        single = batchnorm.convert(copy.deepcopy(model).double(), to=batchnorm.BatchNorm).train()
        xs = x.clone().requires_grad_(True)
        ys = single(xs)
        ys_d = ys.detach()
        (ys * w).sum().backward()
        ref_bns = [m for m in single.modules() if isinstance(m, batchnorm.BatchNorm)]
        rm = max(float((a.running_mean - b.running_mean).abs().max()) for a, b in zip(bns, ref_bns))
        rv = max(float((a.running_var - b.running_var).abs().max()) for a, b in zip(bns, ref_bns))
        print(
            f"SyncBN check ({world} processes vs 1 process on the concatenated batch of {sum(sizes)}):\n"
            f"  max |output diff|        {float((y_all - ys_d).abs().max()):.3e}\n"
            f"  max |input-grad diff|    {float((dx_all - xs.grad).abs().max()):.3e}\n"
            f"  max |running_mean diff|  {rm:.3e}\n"
            f"  max |running_var diff|   {rv:.3e}",
            flush=True,
        )
    dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples to generate (80 %% train)")
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.backend == "nccl" else "cpu")
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)

    base = make_model()
    sync_check(base, rank, world)

    model = batchnorm.convert(base, to=batchnorm.SyncBatchNorm).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    first_bn = next(m for m in model.modules() if isinstance(m, batchnorm.SyncBatchNorm))
    seen: dict[str, torch.Tensor] = {}
    first_bn.register_forward_pre_hook(lambda mod, inp: seen.__setitem__("x", inp[0].detach()))

    x, y, xt, yt = mnist1d() if args.samples == 5000 else small_mnist1d(args.samples)
    train = TensorDataset(x, y)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    if rank == 0:
        print(f"training on {world} processes ({args.backend}), {len(train)} samples, "
              f"global batch {args.batch_size * world}", flush=True)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        t0 = time.perf_counter()
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            out = ddp(xb)
            loss = nn.functional.cross_entropy(out, yb)
            loss.backward()
            opt.step()
            stats += torch.tensor([loss.item() * len(yb), float((out.argmax(1) == yb).sum()), len(yb)])
        local = seen["x"]  # the first BN's input in this rank's last batch
        lmean, lvar, n = batchnorm.batch_stats(local)
        say(rank, f"epoch {epoch + 1}: {int(stats[2])} samples, loss {stats[0] / stats[2]:.4f}, "
                  f"train acc {stats[1] / stats[2]:.3f}; last local batch {tuple(local.shape)}: first BN channel 0 "
                  f"mean {float(lmean[0]):+.4f} var {float(lvar[0]):.4f} over {int(n[0])} values")
        # the statistics that normalized that batch: the union of all ranks' last batches
        cnt, mu, m2 = (t.to(torch.float64).clone() for t in (n, lmean, lvar * n))
        both = torch.stack([cnt, cnt * mu])
        dist.all_reduce(both)
        gmean = both[1] / both[0]
        m2 = m2 + cnt * (mu - gmean) ** 2
        dist.all_reduce(m2)
        gvar = m2 / both[0]
        dist.all_reduce(stats)
        rm = first_bn.running_mean.clone()
        ranks_rm = [torch.zeros_like(rm) for _ in range(world)]
        dist.all_gather(ranks_rm, rm)
        spread = float(torch.stack(ranks_rm).std(0, unbiased=False).max()) if world > 1 else 0.0
        model.eval()
        with torch.no_grad():
            acc = float((model(xt.to(device)).argmax(1) == yt.to(device)).float().mean())
        if rank == 0:
            print(f"[global] epoch {epoch + 1}: {int(stats[2])} samples, loss {stats[0] / stats[2]:.4f}, "
                  f"train acc {stats[1] / stats[2]:.3f}, test acc {acc:.3f}; synchronized first-BN channel 0 "
                  f"mean {float(gmean[0]):+.4f} var {float(gvar[0]):.4f} over {int(both[0][0])} values; running "
                  f"stats spread across ranks {spread:.1e}; {time.perf_counter() - t0:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
