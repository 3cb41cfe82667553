import os

import pytest
import torch

os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".numba_cache"))
# no background compile process in tests: "auto" uses numba at once (its first call compiles, as before);
# tests/test_backends.py exercises the warm-up explicitly
os.environ.setdefault("BATCHNORM_WARMUP", "off")


# the value this session started with: modules that need Triton's interpreter set TRITON_INTERPRET=1 when they are
# imported (triton reads it when the kernels are jitted), and triton_interpreter puts this value back after them
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 while one module's tests run (another module's teardown may have removed it since
    collection), then the value the session started with."""
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _TRITON_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _TRITON_INTERPRET


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
