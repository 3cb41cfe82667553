"""Padded sequences with masks: BN statistics over the real steps only.

    python examples/masked_sequences.py [--steps 150]

MNIST-1D sequences (length 40) are cut to random lengths and zero-padded. A BatchNorm with the
feature axis last (``axis=-1``, input ``(N, L, C)``) takes ``mask=`` (true on real steps), so padding
never enters its mean and variance. The script checks that against the statistics of the unpadded
steps, then trains a small sequence classifier with masks and prints its test accuracy.
"""

import argparse

import torch
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn

import batchnorm as bn

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples to generate (80 %% train)")
args = ap.parse_args()
torch.manual_seed(0)
data_args = get_dataset_args()
data_args.num_samples = args.samples
d = make_dataset(data_args)                     # MNIST-1D, procedural: nothing downloads
seq, seq_t = (torch.as_tensor(d[k], dtype=torch.float32)[..., None] for k in ("x", "x_test"))  # (N, L, C), C = 1
y, yt = torch.as_tensor(d["y"]).long(), torch.as_tensor(d["y_test"]).long()


def padded(s: torch.Tensor, seed: int):
    lengths = torch.randint(24, 41, (len(s),), generator=torch.Generator().manual_seed(seed))
    mask = torch.arange(s.shape[1]) < lengths[:, None]   # (N, L), true on real steps
    return s * mask[..., None], mask


seq, mask = padded(seq, 0)
seq_t, mask_t = padded(seq_t, 1)

# 1. the statistics count real steps only
layer = bn.BatchNorm(1, axis=-1)
layer(seq[:64], mask=mask[:64])
real = seq[:64][mask[:64]]                       # (number of real steps, C)
err = float((layer.running_mean - 0.1 * real.mean(0)).abs().max())  # momentum 0.1 from a zero start
print(f"running mean vs the mean of the unpadded steps: max difference {err:.1e}")


# 2. a classifier on padded sequences
class Net(nn.Module):
    def __init__(self, h=32):
        super().__init__()
        self.inp, self.bn1 = nn.Linear(1, h, bias=False), bn.BatchNorm(h, axis=-1)
        self.conv, self.bn2 = nn.Conv1d(h, h, 5, padding=2, bias=False), bn.BatchNorm(h, axis=-1)
        self.head = nn.Linear(h, 10)

    def forward(self, s, m):
        z = torch.relu(self.bn1(self.inp(s), mask=m)) * m[..., None]
        z = torch.relu(self.bn2(self.conv(z.transpose(1, 2)).transpose(1, 2), mask=m)) * m[..., None]
        return self.head(z.sum(1) / m.sum(1, keepdim=True))  # mean over the real steps


net = Net()
opt = torch.optim.Adam(net.parameters(), lr=3e-3)
for _ in range(args.steps):
    i = torch.randint(0, len(seq), (64,))
    loss = nn.functional.cross_entropy(net(seq[i], mask[i]), y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()
net.eval()
with torch.no_grad():
    acc = float((net(seq_t, mask_t).argmax(1) == yt).float().mean())
print(f"test accuracy on padded sequences (10 classes): {acc:.3f}")
