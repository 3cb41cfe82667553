"""Fold batch norm into the neighbouring convolutions for deployment.

    python examples/fold_for_deployment.py [--steps 20]

In evaluation mode a BN layer is a per-channel affine map, so batchnorm.fold merges it into the
conv before it (or the linear/1x1 conv after it); what cannot be merged becomes a FrozenBatchNorm.
A zoo ResNet-18 is trained a few steps (so its statistics are not the initial ones), folded, and the
folded model is checked against the original: same outputs, no BN layer left to run.
"""

import argparse

import torch
from torch import nn

import batchnorm as bn
from batchnorm.zoo import example_input, resnet18_cifar

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
args = ap.parse_args()
torch.manual_seed(0)
model = resnet18_cifar(num_classes=10, width=8)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for step in range(args.steps):  # a few steps on random data: the running statistics move away from 0/1
    x = example_input(3, batch=16, size=16, seed=step) * 2 + 0.5
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,)))
    opt.zero_grad()
    loss.backward()
    opt.step()

model.eval()
folded, records = bn.fold(model, report=True)
x = example_input(3, batch=8, size=16, seed=999)
with torch.no_grad():
    diff = float((folded(x) - model(x)).abs().max())
kinds = {}
for r in records:
    kinds[r.action] = kinds.get(r.action, 0) + 1
left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
print(f"{len(records)} BN layers: {kinds}; BatchNorm modules left in the folded model: {left}")
print(f"max |folded - original| output difference: {diff:.2e}")
