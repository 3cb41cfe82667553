"""``python -m batchnorm.kernels.triton compile --arch sm_80 sm_90``: see :mod:`batchnorm.kernels.triton.compile`."""

import sys

from .compile import main

sys.exit(main())
