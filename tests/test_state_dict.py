"""State: state-dict keys and round trips with torch, legacy checkpoints, resets, copies, dtype moves, repr."""

from __future__ import annotations

import copy
import io
import pickle
from collections import OrderedDict

import pytest
import torch
from harness import TOL, Case, assert_close, make_input, make_pair, torch_cls
from torch import nn

from batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

CONFIGS = [
    dict(),
    dict(affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(momentum=None, eps=1e-3),
    dict(affine=False, track_running_stats=False),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
@pytest.mark.parametrize("rank", [2, 4, 5])
def test_state_dict_keys_shapes_dtypes_match_torch(kw, rank) -> None:
    ours, ref = BatchNorm(4, **kw), torch_cls(rank)(4, **kw)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in b:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]


def _trained_torch(rank: int, kw: dict, steps: int = 3) -> nn.Module:
    ref = torch_cls(rank)(4, **kw)
    shape = {2: (6, 4), 3: (3, 4, 5), 4: (2, 4, 3, 3), 5: (2, 4, 2, 2, 3)}[rank]
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 2)
        if ref.bias is not None:
            ref.bias.uniform_(-1, 1)
        for i in range(steps):
            ref(torch.randn(shape) * (i + 1) + i)
    return ref


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_torch_to_ours_to_torch_identical_outputs(kw, rank) -> None:
    ref = _trained_torch(rank, kw)
    ours = BatchNorm(4, **kw)
    ours.load_state_dict(ref.state_dict())
    back = torch_cls(rank)(4, **kw)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = make_input(Case({2: (5, 4), 3: (3, 4, 6), 4: (2, 4, 3, 3), 5: (2, 4, 2, 3, 2)}[rank]))
    for m in (ref, ours, back):
        m.eval()
    y_ref = ref(x)
    assert torch.equal(back(x), y_ref)
    assert_close(ours(x), y_ref, (1e-6, 1e-6), "ours after loading torch's state")
    # and training continues identically from the loaded state
    ref.train()
    ours.train()
    for i in range(2):
        xi = x * (i + 2)
        assert_close(ours(xi), ref(xi), TOL[torch.float32]["fwd"], "train after load")
    for k, v in ref.state_dict().items():
        assert_close(ours.state_dict()[k], v, TOL[torch.float32]["stat"], k)


def test_save_and_load_through_torch_save() -> None:
    ref = _trained_torch(4, {})
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    ours = BatchNorm2d(4)
    ours.load_state_dict(torch.load(buf, weights_only=True))
    assert int(ours.num_batches_tracked) == 3


@pytest.mark.parametrize("version", [None, 1])
def test_legacy_state_dict_without_num_batches_tracked(version) -> None:
    """Checkpoints from before num_batches_tracked (version < 2) load, like torch's, with the count kept at 0."""
    ref = _trained_torch(2, {})
    legacy = OrderedDict((k, v) for k, v in ref.state_dict().items() if k != "num_batches_tracked")
    legacy._metadata = OrderedDict({"": {"version": version}} if version is not None else {})  # type: ignore[attr-defined]
    ours, fresh_torch = BatchNorm1d(4), nn.BatchNorm1d(4)
    r1 = ours.load_state_dict(copy.copy(legacy))
    r2 = fresh_torch.load_state_dict(copy.copy(legacy))
    assert r1.missing_keys == r2.missing_keys == [] and r1.unexpected_keys == r2.unexpected_keys == []
    assert int(ours.num_batches_tracked) == int(fresh_torch.num_batches_tracked) == 0
    assert torch.equal(ours.running_mean, ref.running_mean)


def test_current_state_dict_without_num_batches_tracked_is_a_missing_key() -> None:
    """A version-2 checkpoint that lost num_batches_tracked is an error in both, not silently patched."""
    for layer in (BatchNorm(4), nn.BatchNorm1d(4)):
        sd = nn.BatchNorm1d(4).state_dict()  # carries _metadata version 2
        del sd["num_batches_tracked"]
        with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
            layer.load_state_dict(sd)


def test_strict_missing_and_unexpected_keys_like_torch() -> None:
    sd = nn.BatchNorm1d(4, affine=False).state_dict()
    for layer in (BatchNorm(4), nn.BatchNorm1d(4)):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight\", \"bias\""):
            layer.load_state_dict(sd)
    res = BatchNorm(4, affine=False).load_state_dict(nn.BatchNorm1d(4).state_dict(), strict=False)
    assert res.unexpected_keys == ["weight", "bias"]


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_mismatched_shapes_raise_value_error_and_change_nothing(key) -> None:
    ours = BatchNorm(4)
    with torch.no_grad():
        ours.weight.fill_(2.0)
        ours.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    sd = nn.BatchNorm1d(4).state_dict()
    sd[key] = torch.zeros(6)
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(6,\) in the checkpoint but this layer expects \(4,\).*num_features=6"):
        ours.load_state_dict(sd)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reset_running_stats_and_parameters() -> None:
    ours, ref = make_pair(Case((4, 3, 5)))
    for m in (ours, ref):
        m(torch.randn(4, 3, 5) * 3 + 1)
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert int(ours.num_batches_tracked) == 0
    assert not torch.equal(ours.weight, torch.ones(3))  # parameters untouched by reset_running_stats
    ours.reset_parameters()
    ref.reset_parameters()
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    BatchNorm(3, affine=False, track_running_stats=False).reset_parameters()  # nothing to reset: no error
    nobias = BatchNorm(3, bias=False)
    nobias.reset_parameters()
    assert nobias.bias is None


def test_repr_matches_torch_plus_axis() -> None:
    for kw in CONFIGS:
        r = repr(BatchNorm(5, **kw))
        t = repr(nn.BatchNorm2d(5, **kw))
        assert r == t.replace("BatchNorm2d(", "BatchNorm(")[:-1] + ", axis=1)", (r, t)
    assert repr(BatchNorm(5, axis=-1)).endswith("axis=-1)")
    assert repr(BatchNorm3d(2)).startswith("BatchNorm3d(2, eps=1e-05, momentum=0.1")


def test_deepcopy_and_pickle_preserve_state_and_behaviour() -> None:
    layer = BatchNorm(3, momentum=None, axis=-1)
    layer(torch.randn(5, 4, 3))
    x = torch.randn(5, 4, 3)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.axis == -1 and clone.momentum is None
        for k, v in layer.state_dict().items():
            assert torch.equal(clone.state_dict()[k], v)
            assert clone.state_dict()[k].data_ptr() != v.data_ptr()
        clone.eval()
        layer.eval()
        assert torch.equal(clone(x), layer(x))
        layer.train()
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded.running_var, layer.running_var)


@pytest.mark.parametrize("move", ["double", "half", "bfloat16", "to_float64", "float"])
def test_module_dtype_moves_like_torch(move) -> None:
    ours, ref = BatchNorm(3), nn.BatchNorm1d(3)
    for m in (ours, ref):
        if move == "to_float64":
            m.to(torch.float64)
        else:
            getattr(m, move)()
    for k, v in ref.state_dict().items():
        assert ours.state_dict()[k].dtype == v.dtype, (move, k)
    dtype = ours.weight.dtype
    x = torch.randn(6, 3, 4).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    assert_close(y, ref(x), TOL[dtype]["fwd"] if dtype in TOL else (1e-3, 1e-3), f"after .{move}()")
    assert_close(ours.running_var, ref.running_var, TOL[dtype]["fwd"] if dtype in TOL else (1e-3, 1e-3), "running_var")


def test_train_and_eval_return_self_and_flags() -> None:
    layer = BatchNorm(3)
    assert layer.eval() is layer and not layer.training
    assert layer.train() is layer and layer.training


def test_last_input_shape_recorded() -> None:
    layer = BatchNorm(3, axis=-1)
    layer(torch.randn(2, 5, 3))
    assert layer.last_input_shape == (2, 5, 3)


@pytest.mark.parametrize("cls", [BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d])
def test_instances_of_nn_module_and_parameters_registered(cls) -> None:
    layer = cls(3)
    assert isinstance(layer, nn.Module)
    assert sum(p.numel() for p in layer.parameters()) == 6
    assert all(p.requires_grad for p in layer.parameters())


def test_torch_fuse_conv_bn_eval_accepts_our_layer() -> None:
    """torch.nn.utils.fusion reads weight/bias/running stats/eps by name: it works on ours as on torch's."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv = nn.Conv2d(3, 4, 3).eval()
    ours = BatchNorm2d(4)
    ours(torch.randn(8, 4, 5, 5) * 3 + 1)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    ours.eval()
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(fuse_conv_bn_eval(conv, ours)(x), ours(conv(x)), rtol=1e-5, atol=1e-5)
