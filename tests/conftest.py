import os

import pytest
import torch

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _backends():
    from batchnorm.kernels import dispatch

    return dispatch.available()


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    """Run the test once per available kernel path, forced through BATCHNORM_BACKEND."""
    monkeypatch.setenv("BATCHNORM_BACKEND", request.param)
    return request.param
