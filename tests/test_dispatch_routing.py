"""Which backend a call runs on: ``dispatch.select`` / ``dispatch.chosen`` routing tables.

Off the CPU (issue 11, item 6; issue 17): plain batch norm goes to ``"native"`` (ATen: cuDNN / MIOpen), the
variants (mask, ghost batches, batch renorm, cross-process sync, ``memory="save"``) to ``"triton"`` where it can
serve them and otherwise to ``"composite"``: here triton is made unable to serve (``fake_gpu``), so the fallback
is what these tables check; tests/test_gpu_route.py checks the triton side.
There is no GPU here, so the device check (``dispatch.device_type``, the one function ``select`` asks)
is mocked to answer ``"cuda"`` for CPU tensors (the calls then really run, on the CPU, through the
backend chosen for a GPU), and ``meta`` tensors are used as genuinely non-CPU tensors.
On the CPU: forced backends, the ``"torch"`` alias, the environment variable, fallbacks of a forced
backend that cannot serve a call, and the cost table's crossover.
"""

from __future__ import annotations

import pytest
import torch

from batchnorm import BatchNorm, BatchRenorm, GhostBatchNorm, SyncBatchNorm
from batchnorm.kernels import dispatch
from batchnorm.layers import sync as sync_module

HAS_NUMBA = "numba" in dispatch.available()
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")


@pytest.fixture
def fake_gpu(monkeypatch):
    """Make ``select`` see every tensor as a CUDA tensor, with triton unable to serve (the fallback rule; the triton
    route, which Triton's CPU interpreter would otherwise take for these CPU tensors, is in tests/test_gpu_route.py)."""
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "_triton_for", lambda x, s: None)


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)


@pytest.fixture
def numba_ready():
    if not HAS_NUMBA or not dispatch.wait_ready(600):
        pytest.skip("numba kernels are not available here")


def _recording(monkeypatch) -> list[str]:
    """Record the name of every backend ``dispatch.select`` hands out (the forward really runs on it)."""
    used: list[str] = []
    real = dispatch.select

    def spy(*args, **kwargs):
        b = real(*args, **kwargs)
        used.append(b.name)
        return b

    monkeypatch.setattr(dispatch, "select", spy)
    return used


# --------------------------------------------------------------------------- off the CPU

# (label, layer factory, input shape, mask?, expected backend)
GPU_TABLE = [
    ("plain BN, (N, C, H, W)", lambda: BatchNorm(4), (6, 4, 3, 3), False, "native"),
    ("plain BN, (N, C)", lambda: BatchNorm(4), (6, 4), False, "native"),
    ("plain BN, axis=-1", lambda: BatchNorm(4, axis=-1), (6, 5, 4), False, "native"),
    ("plain BN + fused relu (second op)", lambda: BatchNorm(4, activation="relu"), (6, 4, 3), False, "native"),
    ("plain BN, no affine, no running stats", lambda: BatchNorm(4, affine=False, track_running_stats=False),
     (6, 4, 3), False, "native"),
    ("masked BN", lambda: BatchNorm(4), (6, 4, 3), True, "composite"),
    ("ghost BN", lambda: GhostBatchNorm(4, virtual_batch_size=2), (6, 4, 3), False, "composite"),
    ("batch renorm", lambda: BatchRenorm(4), (6, 4, 3), False, "composite"),
    ("memory='save'", lambda: BatchNorm(4, activation="leaky_relu", memory="save"), (6, 4, 3), False, "composite"),
]


@pytest.mark.parametrize("label,make,shape,masked,expected", GPU_TABLE, ids=[r[0] for r in GPU_TABLE])
def test_on_a_gpu_plain_bn_is_native_and_variants_are_composite(fake_gpu, monkeypatch, label, make, shape, masked,
                                                                expected):
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    mask = torch.rand(shape[0], *shape[2:]) > 0.3 if masked else None
    if isinstance(layer, BatchRenorm):
        layer.num_batches_tracked.fill_(10_000)  # past the warm-up, where r and d are active
    assert dispatch.chosen(layer, x, mask) == expected
    used = _recording(monkeypatch)
    y = layer(x, mask) if masked else layer(x)
    y.sum().backward()
    assert used and set(used) == {expected}, f"{label}: the forward ran on {used}, chosen() said {expected}"
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("make,expected", [(lambda: BatchNorm(4), "native"),
                                           (lambda: BatchNorm(4, activation="silu"), "native"),
                                           (lambda: GhostBatchNorm(4, virtual_batch_size=2), "native")],
                         ids=["plain", "fused silu", "ghost (eval uses the running statistics)"])
def test_on_a_gpu_eval_mode_is_native(fake_gpu, monkeypatch, make, expected):
    layer = make().eval()
    x = torch.randn(6, 4, 3)
    assert dispatch.chosen(layer, x) == expected
    used = _recording(monkeypatch)
    with torch.no_grad():
        layer(x)
    assert set(used) == {expected}


def test_on_a_gpu_sync_bn_across_processes_is_composite(fake_gpu, monkeypatch):
    layer = SyncBatchNorm(4)
    x = torch.randn(6, 4, 3)
    assert dispatch.chosen(layer, x) == "native"  # one process: plain batch norm
    layer(x)  # records the local batch shape the cross-process combine needs
    monkeypatch.setattr(sync_module, "_group_world", lambda group: 2)
    assert dispatch.chosen(layer, x) == "composite"


@needs_numba
def test_the_device_check_is_what_moves_a_call_off_numba(numba_ready, monkeypatch):
    """Control: the same layers and tensors that the CPU sends to numba go to native / composite on a GPU."""
    big = torch.randn(4 * max(dispatch.CROSSOVER_BYTES.values()) // (4 * 8 * 4) + 8, 8, 4)
    small = torch.randn(8, 4, 3)
    plain, ghost = BatchNorm(8), GhostBatchNorm(4, virtual_batch_size=2)
    assert (dispatch.chosen(plain, big), dispatch.chosen(ghost, small)) == ("numba", "numba")
    monkeypatch.setattr(dispatch, "device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "_triton_for", lambda x, s: None)
    assert (dispatch.chosen(plain, big), dispatch.chosen(ghost, small)) == ("native", "composite")


def test_on_a_gpu_the_rule_holds_at_every_size(fake_gpu):
    """No cost table off the CPU: numba is never a candidate, however large the tensor."""
    from batchnorm.kernels.backend import Settings

    for numel in (8, 1 << 16, 1 << 22):
        x = torch.empty(numel // 4, 4)
        assert dispatch.select(x, Settings(axis=1)).name == "native"
        assert dispatch.select(x, Settings(axis=1), masked=True).name == "composite"
        assert dispatch.select(x, Settings(axis=1, group_size=2)).name == "composite"
        assert dispatch.select(x, Settings(axis=1), plain=False).name == "composite"


@pytest.mark.parametrize("forced", ["numba", "native", "composite", "torch"])
def test_on_a_gpu_a_forced_backend_that_cannot_serve_falls_back_to_composite(fake_gpu, forced):
    plain = BatchNorm(4, backend=forced)
    ghost = GhostBatchNorm(4, virtual_batch_size=2, backend=forced)
    x = torch.randn(6, 4, 3)
    assert dispatch.chosen(plain, x) == ("native" if forced == "native" else "composite")
    assert dispatch.chosen(ghost, x) == "composite"


# (label, layer factory, mask?, expected)
META_TABLE = [
    ("plain BN", lambda: BatchNorm(4), False, "native"),
    ("masked BN", lambda: BatchNorm(4), True, "composite"),
    ("ghost BN", lambda: GhostBatchNorm(4, virtual_batch_size=2), False, "composite"),
    ("batch renorm", lambda: BatchRenorm(4), False, "composite"),
]


@pytest.mark.parametrize("label,make,masked,expected", META_TABLE, ids=[r[0] for r in META_TABLE])
def test_meta_tensors_are_routed_as_non_cpu_tensors_without_mocking(label, make, masked, expected):
    layer = make().to("meta")
    x = torch.empty(6, 4, 3, device="meta")
    mask = torch.empty(6, 3, dtype=torch.bool, device="meta") if masked else None
    assert dispatch.device_type(x) == "meta"
    assert dispatch.chosen(layer, x, mask) == expected


# --------------------------------------------------------------------------- on the CPU

def test_aliases_and_names():
    assert set(dispatch.available()) >= {"composite", "native"}
    assert {"auto", "numba", "composite", "native", "torch"} <= set(dispatch.BACKENDS)
    x = torch.randn(8, 4, 3)
    assert dispatch.chosen(BatchNorm(4, backend="torch"), x) == "composite"
    assert dispatch.chosen(BatchNorm(4, backend="composite"), x) == "composite"
    assert dispatch.chosen(BatchNorm(4, backend="native"), x) == "native"


@needs_numba
def test_forced_numba_serves_plain_and_variants(numba_ready):
    x = torch.randn(8, 4, 3)
    for layer in (BatchNorm(4, backend="numba"), GhostBatchNorm(4, virtual_batch_size=2, backend="numba"),
                  BatchRenorm(4, backend="numba"), BatchNorm(4, activation="leaky_relu", memory="save", backend="numba")):
        assert dispatch.chosen(layer, x) == "numba", type(layer).__name__


# (label, layer factory, input factory, mask?, expected) — forced backends that cannot serve the call
FALLBACK_TABLE = [
    ("native, masked", lambda: BatchNorm(4, backend="native"), lambda: torch.randn(8, 4, 3), True, "composite"),
    ("native, ghost", lambda: GhostBatchNorm(4, virtual_batch_size=2, backend="native"), lambda: torch.randn(8, 4, 3),
     False, "composite"),
    ("native, renorm", lambda: BatchRenorm(4, backend="native"), lambda: torch.randn(8, 4, 3), False, "composite"),
    ("native, memory='save'", lambda: BatchNorm(4, activation="leaky_relu", memory="save", backend="native"),
     lambda: torch.randn(8, 4, 3), False, "composite"),
    ("numba, float16", lambda: BatchNorm(4, backend="numba"), lambda: torch.randn(8, 4, 3).half(), False, "composite"),
    ("numba, strided view with gaps", lambda: BatchNorm(4, backend="numba"), lambda: torch.randn(8, 4, 6)[:, :, ::2],
     False, "composite"),
]


@pytest.mark.parametrize("label,make,make_x,masked,expected", FALLBACK_TABLE, ids=[r[0] for r in FALLBACK_TABLE])
def test_a_forced_backend_that_cannot_serve_the_call_falls_back_to_composite(monkeypatch, label, make, make_x, masked,
                                                                            expected):
    if label.startswith("numba") and not HAS_NUMBA:
        pytest.skip("numba is not installed")
    layer, x = make(), make_x()
    mask = torch.rand(x.shape[0], *x.shape[2:]) > 0.3 if masked else None
    if isinstance(layer, BatchRenorm):
        layer.num_batches_tracked.fill_(10_000)
    assert dispatch.chosen(layer, x, mask) == expected
    used = _recording(monkeypatch)
    layer(x, mask) if masked else layer(x)
    assert set(used) == {expected}


def test_environment_variable_forces_and_the_argument_wins(monkeypatch):
    x = torch.randn(8, 4, 3)
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert dispatch.chosen(BatchNorm(4), x) == "composite"
    assert dispatch.chosen(BatchNorm(4, backend="native"), x) == "native"
    monkeypatch.setenv("BATCHNORM_BACKEND", "native")
    assert dispatch.chosen(BatchNorm(4), x) == "native"


@pytest.mark.parametrize("bad", ["cuda", "Numba", "Triton"])
def test_unknown_backend_names_say_what_to_pass(monkeypatch, bad):
    x = torch.randn(8, 4, 3)
    monkeypatch.setenv("BATCHNORM_BACKEND", bad)
    with pytest.raises(ValueError, match=f"backend must be one of .* got {bad!r}. Pass backend='auto'"):
        dispatch.chosen(BatchNorm(4), x)


def _just(nbytes: int, lay: str) -> torch.Tensor:
    """A float32 tensor of exactly ``nbytes`` bytes in the given layout class (features: 8)."""
    n = nbytes // 4
    if lay == "inner":
        return torch.randn(n // 8, 8)
    if lay == "cl":
        return torch.randn(n // 64, 8, 2, 4).contiguous(memory_format=torch.channels_last)
    if lay == "short":  # rows of 8 values
        return torch.randn(n // 64, 8, 8)
    return torch.randn(n // 512, 8, 64)  # "outer": rows of 64


@needs_numba
@pytest.mark.parametrize("key", sorted(dispatch.CROSSOVER_BYTES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_auto_on_the_cpu_follows_the_cost_table_at_its_crossover(numba_ready, key):
    mode, lay = key
    cross = dispatch.CROSSOVER_BYTES[key]
    if cross < 1024 or cross > 1 << 28:
        pytest.skip(f"crossover {cross} B is outside what this test allocates")
    below, at = _just(cross // 2, lay), _just(cross, lay)
    assert dispatch.layout(below, 1) == lay and dispatch.layout(at, 1) == lay
    for x, expected in ((below, "native"), (at, "numba")):
        layer = BatchNorm(8)
        if mode == "eval":
            layer.eval()
        assert dispatch.chosen(layer, x) == expected, (key, tuple(x.shape))


@needs_numba
def test_auto_on_the_cpu_sends_variants_to_numba_at_any_size(numba_ready):
    x = torch.randn(8, 4, 3)
    assert dispatch.chosen(BatchNorm(4), x) == "native"  # tiny plain call: ATen's kernel is cheaper
    for layer, mask in ((BatchNorm(4), torch.rand(8, 3) > 0.3), (GhostBatchNorm(4, virtual_batch_size=2), None),
                        (BatchRenorm(4), None), (BatchNorm(4, activation="leaky_relu", memory="save"), None)):
        assert dispatch.chosen(layer, x, mask) == "numba", type(layer).__name__
