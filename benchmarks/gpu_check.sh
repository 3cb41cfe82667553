#!/usr/bin/env bash
# One-GPU check of batchnorm, for a user with one CUDA GPU (under 8 minutes on an H100-class GPU):
#   1. a training and an eval step of every layer and variant under torch.cuda.set_sync_debug_mode("error")
#      (any host sync on a step raises);
#   2. a converted ResNet-18 training step captured in a CUDA graph (torch.cuda.graph) and replayed;
#   3. the GPU bench at quick sizes (batchnorm bench --device cuda --quick), ratios against torch's BN;
# then everything as one Markdown table. Exit status 1 on any failure, or when there is no CUDA device.
#
# It installs nothing: run it in an environment that has batchnorm and a CUDA build of torch (and triton,
# pip install 'batchnorm[gpu]'). PYTHON=/path/to/python picks the interpreter (default: python).
#
#   bash benchmarks/gpu_check.sh            # or: python -m batchnorm.bench_gpu check
set -euo pipefail
PY="${PYTHON:-python}"
if ! "$PY" -c "import batchnorm, torch" 2>/dev/null; then
    echo "gpu_check: '$PY' cannot import batchnorm and torch; activate the environment you installed them in" \
         "(pip install -e '.[gpu]'), or set PYTHON=/path/to/python." >&2
    exit 1
fi
exec "$PY" -m batchnorm.bench_gpu check "$@"
