"""Adapt BN statistics to shifted test data (no labels), and prediction-time BN.

    python examples/adapt_to_shift.py [--steps 300]

A CNN trained on clean digits is tested on noisy ones. batchnorm.adapt re-estimates every BN layer's
statistics on 256 unlabeled noisy images, mixed with the training statistics by a pseudo sample size
(prior N; Schneider et al. 2020); batchnorm.prediction_time_bn normalizes each test batch with its own
statistics instead (Nado et al. 2020). Weights never change. Prints the test error of each.
"""

import argparse

import torch

import batchnorm as bn
from batchnorm.lab import train
from batchnorm.lab.core import Context
from batchnorm.lab.shift import corrupt, digit_cnn, digits

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
args = ap.parse_args()
torch.manual_seed(0)
x, y = digits()
model = digit_cnn()
train.fit(model, (x[:2976], y[:2976]), ctx=Context(progress=False), lr=0.1, seed=0, steps=args.steps,
          batch_size=64, final_train_eval=False)
target = corrupt(x[2976:3232], "noise", 0.1, seed=1)      # unlabeled images from the deployment data
xt, yt = corrupt(x[4000:], "noise", 0.1, seed=2), y[4000:]   # noisy test set


def error(m) -> float:
    m.eval()
    with torch.no_grad():
        return 100 * float((m(xt).argmax(1) != yt).float().mean())


print(f"source statistics:          {error(model):5.1f} % test error")
report = bn.adapt(model, [target], prior=16)               # in place: running_mean / running_var only
print(report.table())
print(f"adapt (256 samples, N=16):  {error(model):5.1f} % test error")
with torch.no_grad(), bn.prediction_time_bn(model, prior=0):
    wrong = sum(int((model(xt[i:i + 100]).argmax(1) != yt[i:i + 100]).sum()) for i in range(0, len(xt), 100))
print(f"prediction-time BN (batches of 100): {100 * wrong / len(xt):5.1f} % test error")
