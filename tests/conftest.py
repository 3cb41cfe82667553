import os

import pytest
import torch

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
