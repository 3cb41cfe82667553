import os

import pytest
import torch

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))
# no background compile process in tests: "auto" uses numba at once (its first call compiles, as before);
# tests/test_backends.py exercises the warm-up explicitly
os.environ.setdefault("BATCHNORM_WARMUP", "off")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _backends():
    from batchnorm.kernels import dispatch

    return dispatch.available()


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    """Run the test once per available backend (numba, composite, native), forced through BATCHNORM_BACKEND."""
    monkeypatch.setenv("BATCHNORM_BACKEND", request.param)
    return request.param
