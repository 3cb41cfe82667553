"""fold: an inference copy of a model with eval-mode BN folded into neighbouring conv/linear layers."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import activations as _activations
from ..layers.frozen import FrozenBatchNorm
from .convert import after_modules, bn_features, bn_kind, is_frozen

__all__ = ["fold", "FoldRecord"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class FoldRecord:
    """One BN layer's fate in :func:`fold`.

    ``action`` is ``"folded_into_previous"`` (into the conv/linear that feeds it), ``"folded_into_next"``
    (into the linear / 1×1 conv it feeds), ``"frozen"`` (became a FrozenBatchNorm affine), or
    ``"skipped"`` (left as it was); ``target`` names the conv/linear layer, ``reason`` says why.
    """

    bn: str
    action: str
    target: str | None
    reason: str


class _Unfoldable(Exception):
    pass


def _foldable(m: nn.Module) -> bool:
    """Batch norm (:func:`~batchnorm.tools.bn_kind` ``"bn"``) or batch norm then its own drop/act modules (``"act"``:
    the normalization folds, the modules stay after the folded layer)."""
    return bn_kind(m) in ("bn", "act")


def _tail(bn: nn.Module, fused: nn.Module | None) -> nn.Module | None:
    """What ``bn`` applies after its affine map, as one module (None: nothing): its fused activation, then the
    drop and act modules of an ``"act"`` layer (``nn.Identity`` left out)."""
    mods = ([fused] if fused is not None else []) + [m for m in after_modules(bn) if type(m) is not nn.Identity]
    if not mods:
        return None
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def _normalized(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the normalization of ``bn`` computes for ``x``: its output, or for an ``"act"`` layer the input of its
    first drop/act child (read before an in-place activation overwrites it)."""
    after = after_modules(bn)
    if not after:
        return bn(x)
    seen: list[torch.Tensor] = []
    handle = after[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        bn(x)
    finally:
        handle.remove()
    if not seen:
        raise _Unfoldable(f"its forward did not call its {type(after[0]).__name__} module after normalizing")
    return seen[0]


def _activation(bn: nn.Module) -> nn.Module | None:
    """The fused activation of one of our layers as a torch module (None: no activation), from the one table
    :data:`batchnorm.activations.TABLE`."""
    name = getattr(bn, "activation", None)
    if name in (None, "identity"):
        return None
    if name not in _activations.TABLE:
        raise _Unfoldable(f"its fused activation={name!r} has no torch module equivalent here")
    return _activations.to_module(name, float(getattr(bn, "negative_slope", 0.01)))


def _affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module | None]:
    """Eval-mode ``y = tail(x · a + b)`` of a BN-like layer: float64 ``(C,)`` a, b and what it applies after (its
    fused activation and the drop/act modules of an ``"act"`` layer, as one module; None: nothing)."""
    if is_frozen(bn):
        w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    else:
        if bn.training:
            raise _Unfoldable("in training mode, it normalizes with batch statistics (call model.eval() first)")
        if bn.running_mean is None or bn.running_var is None:  # eval uses batch stats only then (as torch)
            raise _Unfoldable("it has no running statistics (built with track_running_stats=False): it normalizes "
                              "with batch statistics even in eval mode")
        w, b, rm, rv = bn.weight, bn.bias, bn.running_mean, bn.running_var
    if isinstance(rm, nn.parameter.UninitializedBuffer):
        raise _Unfoldable("lazy layer not initialized yet (run one forward first)")
    invstd = torch.rsqrt(rv.detach().double() + bn.eps)
    a = invstd * w.detach().double() if w is not None else invstd
    shift = -rm.detach().double() * a
    if b is not None:
        shift = shift + b.detach().double()
    act = _activation(bn)
    _verify(bn, a, shift, act)
    return a, shift, _tail(bn, act)


def _verify(bn: nn.Module, a: torch.Tensor, b: torch.Tensor, act: nn.Module | None) -> None:
    """Check on a probe that the layer's eval normalization really is ``act(x · a + b)`` (variants may differ)."""
    c = a.numel()
    axis = int(getattr(bn, "axis", 1))
    ref = next(iter(bn.buffers()))
    g = torch.Generator().manual_seed(0)
    last = getattr(bn, "last_input_shape", None)
    was_training = bn.training
    y = x = None
    errors = []
    bn.eval()
    try:
        for rank in (3, 4, 2, 5):  # the first rank the layer accepts (BatchNorm2d wants 4-D, ...)
            if not -rank <= axis < rank:
                continue
            ax = axis % rank
            shape = [3] + [2] * (rank - 1)
            shape[ax] = c
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=ref.dtype, device=ref.device)
            try:
                with torch.no_grad():
                    y = _normalized(bn, x)
                break
            except _Unfoldable:
                raise
            except Exception as err:  # wrong rank for this layer: try the next one
                errors.append(f"{type(err).__name__}: {err}")
                y = None
    finally:
        bn.train(was_training)
        if hasattr(bn, "last_input_shape"):
            bn.last_input_shape = last
    if y is None or x is None:
        raise _Unfoldable(f"could not probe its eval output ({errors[-1] if errors else 'no valid rank'})")
    view = [1] * x.dim()
    view[ax] = c
    expect = x.double() * a.to(x.device).reshape(view) + b.to(x.device).reshape(view)
    if act is not None:
        expect = act(expect)
    tol = 1e-5 if ref.dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.allclose(y.double(), expect, rtol=tol, atol=tol * float(expect.abs().max().clamp_min(1))):
        raise _Unfoldable("its eval output is not the affine map of its running statistics (a variant with other "
                          "eval semantics)")


def _feature_axis_is(bn: nn.Module, want: str, rank: int | None) -> bool:
    """Does the BN normalize the channel axis (``want="channel"``, axis 1) or the last axis (``"last"``)?"""
    axis = int(getattr(bn, "axis", 1))
    if rank == -1:  # the layer saw inputs of several ranks: no single feature axis to rely on
        return False
    if rank is not None:
        axis = axis % rank
        return axis == 1 if want == "channel" else axis == rank - 1
    # rank unknown: conv outputs have rank >= 3, so only axis=1 (or -rank+1, unknowable) is the channel;
    # after a Linear, axis=-1 is the feature axis, and axis=1 is it for the usual (N, C) input.
    if want == "channel":
        return axis == 1
    return axis in (-1, 1)


def _rank_of(bn: nn.Module, name: str, ranks: dict[str, int]) -> int | None:
    """The rank of the layer's input: seen on ``example_input``, else recorded by our layers, else unknown."""
    if name in ranks:
        return ranks[name]
    shape = getattr(bn, "last_input_shape", None)
    return len(shape) if shape else None


def _observe_ranks(model: nn.Module, example_input) -> dict[str, int]:
    """Run a copy of the model once and record every BN-like layer's input rank (-1: it saw several)."""
    probe = copy.deepcopy(model)
    ranks: dict[str, int] = {}
    hooks = []
    for name, m in probe.named_modules():
        if _foldable(m):
            def hook(_m, args, _name=name):
                if args and isinstance(args[0], torch.Tensor):
                    r = args[0].dim()
                    ranks[_name] = r if ranks.get(_name, r) == r else -1
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        _call(probe, example_input)
    for h in hooks:
        h.remove()
    return ranks


def _call(model: nn.Module, example_input):
    return model(*example_input) if isinstance(example_input, tuple) else model(example_input)


# -- folding math (float64, written back in the layer's dtype) -------------------------------------
def _fold_into_previous(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """``BN(layer(x)) = layer'(x)``: scale output channel o by a_o, bias ← a·bias + b."""
    w = layer.weight
    wd = w.detach().double()
    a, b = a.to(wd.device), b.to(wd.device)
    if isinstance(layer, _CONVT):
        groups = layer.groups
        cin, cout_g = wd.shape[0], wd.shape[1]
        view = wd.reshape(groups, cin // groups, cout_g, *wd.shape[2:])
        scale = a.reshape(groups, 1, cout_g, *([1] * (wd.dim() - 2)))
        new_w = (view * scale).reshape(wd.shape)
    else:
        new_w = wd * a.reshape(-1, *([1] * (wd.dim() - 1)))
    old_b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(a)
    new_b = a * old_b + b
    _set_weight_bias(layer, new_w, new_b)


def _set_weight_bias(layer: nn.Module, new_w: torch.Tensor, new_b: torch.Tensor) -> None:
    """Write folded float64 weights back in the layer's dtype, creating the bias if it had none."""
    w = layer.weight
    with torch.no_grad():
        w.copy_(new_w.to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_(new_b.to(layer.bias.dtype))


def _fold_into_next(layer: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """``layer(BN(x)) = layer'(x)``: scale input channel i by a_i, bias ← bias + W·b."""
    w = layer.weight
    wd = w.detach().double()
    a, b = a.to(wd.device), b.to(wd.device)
    if isinstance(layer, nn.Linear):
        new_w = wd * a.reshape(1, -1)
        extra = wd @ b
    else:  # 1×1 conv, weight (out, in/groups, 1, ...)
        groups = layer.groups
        out, cin_g = wd.shape[0], wd.shape[1]
        w2 = wd.reshape(groups, out // groups, cin_g)
        a2 = a.reshape(groups, 1, cin_g)
        b2 = b.reshape(groups, cin_g, 1)
        new_w = (w2 * a2).reshape(wd.shape)
        extra = torch.bmm(w2, b2).reshape(out)
    old_b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(extra)
    new_b = old_b + extra
    _set_weight_bias(layer, new_w, new_b)


def _is_pointwise_conv(m: nn.Module) -> bool:
    if not isinstance(m, _CONV):
        return False
    return all(k == 1 for k in m.kernel_size) and all(p == 0 for p in _padding(m))


def _padding(m: nn.Module) -> tuple[int, ...]:
    if isinstance(m.padding, str):  # "valid", or "same" with a 1-wide kernel: no padding either way
        return (0,) * len(m.kernel_size)
    return tuple(m.padding)


def _frozen_from(bn: nn.Module, act: nn.Module | None = None) -> nn.Module:
    ref = next(iter(bn.buffers()))
    fz = FrozenBatchNorm(bn_features(bn), eps=float(bn.eps), axis=int(getattr(bn, "axis", 1)))
    fz = fz.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name, None)
            if isinstance(src, torch.Tensor):
                getattr(fz, name).copy_(src.detach())
    fz.eval()
    return fz if act is None else nn.Sequential(fz, act)


# -- torch.fx path ---------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """Keep BN-like layers and every other layer of this package (Python code with input checks and
    branches that fx cannot trace) as leaves of the graph; models built from them (``batchnorm.zoo``,
    the lab's) are traced through like any user model."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        ours = type(m).__module__.startswith("batchnorm.layers.")
        return bn_kind(m) is not None or ours or super().is_leaf_module(m, qualname)


def _shared_tensors(root: nn.Module) -> set[int]:
    """ids of parameters owned by more than one module (tied weights): folding would change both."""
    owners: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return {k for k, v in owners.items() if v > 1}


def _exclusive(layer: nn.Module, shared: set[int], graph: fx.Graph | None = None, name: str = "") -> bool:
    """The layer's weight/bias are its own and the graph reads them nowhere else (no get_attr)."""
    if any(id(p) in shared for p in (layer.weight, layer.bias) if p is not None):
        return False
    if graph is not None:
        for node in graph.nodes:
            if node.op == "get_attr" and (node.target == name or str(node.target).startswith(name + ".")):
                return False
    return True


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _fold_fx(root: nn.Module, records: list[FoldRecord], ranks: dict[str, int]) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(root)
    modules = dict(root.named_modules())
    counts = _call_counts(graph)
    shared = _shared_tensors(root)
    # a linear / 1x1 conv can absorb one BN on each side: output side (BN after it), input side (BN before it)
    done_out: set[str] = set()
    done_in: set[str] = set()
    frozen: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or not _foldable(modules[node.target]):
            continue
        name = node.target
        bn = modules[name]
        try:
            a, b, act = _affine(bn)
        except _Unfoldable as why:
            records.append(FoldRecord(name, "skipped", None, str(why)))
            continue
        rank = _rank_of(bn, name, ranks)
        prev = node.args[0] if node.args else None
        extra_args = len(node.args) > 1 or bool(node.kwargs)
        kept = _kept(bn, act)
        # 1) into the conv / linear that feeds it, when that output feeds nothing else
        if isinstance(prev, fx.Node) and prev.op == "call_module":
            layer = modules[prev.target]
            want = "last" if isinstance(layer, nn.Linear) else "channel"
            if (
                isinstance(layer, (*_CONV, *_CONVT, nn.Linear))
                and len(prev.users) == 1
                and counts.get(prev.target, 0) == 1
                and prev.target not in done_out
                and _feature_axis_is(bn, want, rank)
                and getattr(layer, "weight", None) is not None
                and layer.weight.shape[0 if not isinstance(layer, _CONVT) else 1] * (
                    layer.groups if isinstance(layer, _CONVT) else 1) == a.numel()
                and (act is None or not extra_args)
                and _exclusive(layer, shared, graph, prev.target)
            ):
                _fold_into_previous(layer, a, b)
                done_out.add(prev.target)
                if act is None:
                    node.replace_all_uses_with(prev)
                else:  # the conv now computes the affine part; the activation stays as its own module
                    act_name = _free_name(root, name + "_act")
                    _set_submodule(root, act_name, act)
                    with graph.inserting_after(node):
                        act_node = graph.call_module(act_name, (prev,))
                    node.replace_all_uses_with(act_node)
                graph.erase_node(node)
                records.append(FoldRecord(name, "folded_into_previous", prev.target,
                                          f"{type(bn).__name__} after {type(layer).__name__}{kept}"))
                continue
        # 2) into the linear / 1×1 conv it feeds, with nothing in between
        users = list(node.users)
        if len(users) == 1 and not extra_args and act is None:
            nxt = users[0]
            if nxt.op == "call_module" and nxt.args and nxt.args[0] is node and not nxt.kwargs:
                layer = modules[nxt.target]
                ok_linear = isinstance(layer, nn.Linear) and _feature_axis_is(bn, "last", rank)
                ok_conv = _is_pointwise_conv(layer) and _feature_axis_is(bn, "channel", rank)
                if (
                    (ok_linear or ok_conv)
                    and counts.get(nxt.target, 0) == 1
                    and nxt.target not in done_in
                    and layer.weight.shape[1] * (layer.groups if ok_conv else 1) == a.numel()
                    and _exclusive(layer, shared, graph, nxt.target)
                ):
                    _fold_into_next(layer, a, b)
                    done_in.add(nxt.target)
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    records.append(FoldRecord(name, "folded_into_next", nxt.target,
                                              f"{type(bn).__name__} before {type(layer).__name__}"))
                    continue
        # 3) everything else: a fixed affine map
        if act is not None and extra_args:
            records.append(FoldRecord(name, "skipped", None, "it is called with a mask and has a fused activation, "
                                      "which no FrozenBatchNorm expresses"))
            continue
        if name not in frozen:
            frozen[name] = bn if isinstance(bn, FrozenBatchNorm) and act is None else _frozen_from(bn, act)
        records.append(FoldRecord(name, "frozen", None, _why_not(node, modules, counts, bn, rank, shared) + kept))
    for name, fz in frozen.items():
        if any(n.op == "call_module" and n.target == name for n in graph.nodes):
            _set_submodule(root, name, fz)
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__ + "Folded")
    gm.training = root.training  # only the flag: submodules keep their own modes
    return gm


def _kept(bn: nn.Module, tail: nn.Module | None) -> str:
    if tail is None:
        return ""
    if not after_modules(bn):
        return f"; its fused activation is kept as {type(tail).__name__}"
    inner = [type(m).__name__ for m in (tail if type(tail) is nn.Sequential else [tail])]
    return f"; what it applies after normalizing is kept after the folded layer ({', '.join(inner)})"


def _why_not(node: fx.Node, modules: dict, counts: dict, bn: nn.Module, rank: int | None, shared: set[int]) -> str:
    prev = node.args[0] if node.args else None
    if isinstance(prev, fx.Node) and prev.op == "call_module":
        layer = modules[prev.target]
        if isinstance(layer, (*_CONV, *_CONVT, nn.Linear)):
            if len(prev.users) != 1:
                return f"the output of '{prev.target}' is also used elsewhere; folding would change that use"
            if counts.get(prev.target, 0) != 1:
                return f"'{prev.target}' is called more than once in the model"
            if not _exclusive(layer, shared, node.graph, prev.target):
                return f"the weights of '{prev.target}' are tied to another layer or read elsewhere in forward"
            return f"its feature axis (axis={getattr(bn, 'axis', 1)}) is not the output feature axis of '{prev.target}'"
    return "no conv/linear producing its input alone, and no linear/1x1 conv consuming its output alone"


def _free_name(root: nn.Module, name: str) -> str:
    names = dict(root.named_modules())
    candidate, i = name, 1
    while candidate in names:
        candidate, i = f"{name}{i}", i + 1
    return candidate


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


# -- fallback: adjacent pairs inside nn.Sequential ---------------------------------------------------
def _fold_sequential(root: nn.Module, records: list[FoldRecord], error: str, ranks: dict[str, int]) -> nn.Module:
    occurrences: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        occurrences[id(m)] = occurrences.get(id(m), 0) + 1
    names = {id(m): n for n, m in root.named_modules()}
    shared = _shared_tensors(root)
    handled: set[int] = set()  # BN layers already decided
    done_out: set[int] = set()  # layers that absorbed the BN after them
    done_in: set[int] = set()  # layers that absorbed the BN before them
    for seq_name, seq in list(root.named_modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue  # a subclass with its own forward may use its children in any order
        keys = list(seq._modules.keys())
        i = 0
        while i < len(keys):
            bn = seq._modules[keys[i]]
            if bn is None or not _foldable(bn) or id(bn) in handled or occurrences.get(id(bn), 0) != 1:
                i += 1
                continue
            qual = names[id(bn)]
            try:
                a, b, act = _affine(bn)
            except _Unfoldable as why:
                records.append(FoldRecord(qual, "skipped", None, str(why)))
                handled.add(id(bn))
                i += 1
                continue
            rank = _rank_of(bn, qual, ranks)
            prev = seq._modules[keys[i - 1]] if i > 0 else None
            nxt = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
            target = None
            if (
                prev is not None
                and isinstance(prev, (*_CONV, *_CONVT, nn.Linear))
                and occurrences.get(id(prev), 0) == 1
                and id(prev) not in done_out
                and _exclusive(prev, shared)
                and _feature_axis_is(bn, "last" if isinstance(prev, nn.Linear) else "channel", rank)
            ):
                _fold_into_previous(prev, a, b)
                done_out.add(id(prev))
                target, action = prev, "folded_into_previous"
            elif (
                nxt is not None
                and act is None
                and occurrences.get(id(nxt), 0) == 1
                and id(nxt) not in done_in
                and _exclusive(nxt, shared)
                and ((isinstance(nxt, nn.Linear) and _feature_axis_is(bn, "last", rank))
                     or (_is_pointwise_conv(nxt) and _feature_axis_is(bn, "channel", rank)))
            ):
                _fold_into_next(nxt, a, b)
                done_in.add(id(nxt))
                target, action = nxt, "folded_into_next"
            handled.add(id(bn))
            if target is not None:
                seq._modules[keys[i]] = nn.Identity() if act is None else act
                records.append(FoldRecord(qual, action, names[id(target)],
                                          f"adjacent in nn.Sequential '{seq_name}' (fx could not trace: {error})"))
            i += 1
    # every BN-like layer with no record yet (no foldable neighbour, shared, outside any Sequential)
    for qual, m in list(root.named_modules()):
        if not _foldable(m) or any(r.bn == qual for r in records):
            continue
        try:
            _, _, act = _affine(m)
        except _Unfoldable as why:
            records.append(FoldRecord(qual, "skipped", None, str(why)))
            continue
        if not isinstance(m, FrozenBatchNorm) or act is not None:
            _set_submodule(root, qual, _frozen_from(m, act))
        records.append(FoldRecord(qual, "frozen", None,
                                  f"fx could not trace the model ({error}) and it is not next to a foldable "
                                  "conv/linear inside an nn.Sequential"))
    return root


# -- verification on example_input ----------------------------------------------------------------
#: k in the round-off floor k · eps · sqrt(depth) (see _tolerance); measured k ≈ 0.3-0.6 on mobilenet-like nets
ROUNDOFF_K = 16.0
#: the folded model may differ from the original by this many times the original's own round-off
OWN_ROUNDOFF_FACTOR = 8.0


def _depth(model: nn.Module) -> int:
    """Layers whose arithmetic a fold changes or reorders: every conv, linear and BN-like module."""
    return max(1, sum(1 for m in model.modules() if isinstance(m, (*_CONV, *_CONVT, nn.Linear)) or _foldable(m)))


def _rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (in float64)."""
    want64 = want.detach().double()
    return float((got.detach().double() - want64).abs().max() / want64.abs().max().clamp_min(1e-30))


def _own_roundoff(model: nn.Module, example_input, want: torch.Tensor) -> float | None:
    """How far the original model in its own dtype is from a float64 copy of it on the same input:
    the round-off that its depth and conditioning produce (None for float64 models or if a float64
    copy cannot run)."""
    if want.dtype == torch.float64:
        return None
    cast = lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    args = tuple(cast(t) for t in example_input) if isinstance(example_input, tuple) else cast(example_input)
    try:
        with torch.no_grad():
            exact = _call(copy.deepcopy(model).double(), args)
    except Exception:  # a module that only runs in its own dtype: use the depth rule alone
        return None
    if not isinstance(exact, torch.Tensor) or exact.shape != want.shape:
        return None
    return _rel_diff(want, exact)


def _tolerance(model: nn.Module, want: torch.Tensor, own: float | None) -> float:
    r"""The largest relative difference (max |folded − original| / max |original|) that is still round-off.

    Folding rounds every folded weight once (relative error ≤ eps/2, eps = ``torch.finfo(dtype).eps``)
    and sums in another order; each of the ``depth`` conv/linear/BN layers adds independent errors of
    that size, which add up like a random walk: ``ROUNDOFF_K · eps · sqrt(depth)``. A badly conditioned
    network (small running variances, saturating activations) amplifies every such error on the way to
    the output; the original model suffers the same amplification of its own round-off, measured as its
    difference to a float64 copy of itself, so the folded model may also differ by
    ``OWN_ROUNDOFF_FACTOR`` times that. The bound is the larger of the two.
    """
    eps = torch.finfo(want.dtype).eps
    tol = ROUNDOFF_K * eps * _depth(model) ** 0.5
    if own is not None:
        tol = max(tol, OWN_ROUNDOFF_FACTOR * own)
    return tol


def _check_result(model: nn.Module, result: nn.Module, example_input) -> None:
    with torch.no_grad():
        want, got = _call(copy.deepcopy(model), example_input), _call(result, example_input)
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.is_floating_point()):
        return
    err = _rel_diff(got, want)
    own = None
    tol = _tolerance(model, want, None)
    if not err <= tol:  # beyond the depth rule: measure the model's own round-off (a float64 forward) only now
        own = _own_roundoff(model, example_input, want)
        tol = _tolerance(model, want, own)
    if not err <= tol:
        own_note = f", the original's own round-off against float64 {own:.2e}" if own is not None else ""
        warnings.warn(
            f"fold: on example_input the folded model differs from the original by {err:.2e} (relative, max), more "
            f"than round-off allows ({tol:.2e} for {want.dtype} at depth {_depth(model)}{own_note}). "
            "Use the unfolded model and report this model.",
            stacklevel=3,
        )


def fold(model: nn.Module, report: bool = False, *, example_input=None):
    r"""An inference copy of ``model`` with eval-mode batch norm folded into its neighbours.

    In evaluation mode a BN layer is the per-feature affine map ``BN(z) = a ⊙ z + b`` with
    ``a = γ / sqrt(σ²_run + ε)`` and ``b = β − μ_run · a``, so it can be merged into an adjacent
    affine layer. ``model`` is copied (never changed) and traced with ``torch.fx`` (BN layers kept as
    leaves); then, for every BN-like layer in eval mode (:func:`~batchnorm.tools.bn_kind`: torch's ``_BatchNorm``
    classes, ours and its variants, ``FrozenBatchNorm``, torchvision's ``FrozenBatchNorm2d``, and timm's
    ``BatchNormAct2d``/``FrozenBatchNormAct2d``, whose normalization folds while their ``drop`` and ``act`` modules
    stay after the folded layer, as a fused activation of ours does):

    1. if its input is the output of a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or ``Linear`` that
       feeds nothing else (and is called once), it is folded into that layer:
       ``W'_o = a_o W_o`` (output channel o; for transposed convs the weight is
       ``(in, out/groups, …)``), ``bias' = a ⊙ bias + b``. The BN must normalize that layer's output
       feature axis: axis 1 after a conv; the last axis after a ``Linear`` (our ``axis=-1`` on
       ``(N, L, C)``; torch's BatchNorm1d on ``(N, C)``);
    2. else, if its output feeds only a ``Linear`` or a 1×1 ``Conv`` with no padding (called once),
       it is folded into that layer: ``W' = W · diag(a)``, ``bias' = bias + W b`` (per group);
    3. else it becomes a :class:`~batchnorm.FrozenBatchNorm` (the same affine map as a module).

    A linear layer or 1×1 conv absorbs one BN on each side: ``BatchNorm1d → Linear → BatchNorm1d`` on
    ``(N, C)`` folds both, ``W' = diag(a₂) W diag(a₁)``, ``bias' = a₂ ⊙ (bias + W b₁) + b₂`` (the two
    folds commute).

    BN layers in training mode, or without running buffers (``track_running_stats=False``), normalize with batch
    statistics and are left as they are (action ``"skipped"``, with a warning). So is a batch norm that does more than
    batch norm in a way fold does not know (``bn_kind`` ``"unknown"``: its own ``forward`` or other children). Each fold is checked
    on a probe input first, so a variant whose eval output is not that affine map is frozen or
    skipped rather than folded wrongly. The rank of each BN's input is taken from ``example_input``
    when given (one forward of a copy), else from ``last_input_shape`` (our layers record it once the
    model has run), else ``axis=1`` after a ``Linear`` is taken to mean ``(N, C)`` input. If ``torch.fx`` cannot trace the model (data-dependent control flow),
    adjacent pairs inside ``nn.Sequential`` containers are folded instead and every other BN is
    frozen; the records say so. In that fallback a layer used directly elsewhere in ``forward`` as
    well cannot be detected: keep such models traceable.

    The folded model's eval output equals ``model.eval()``'s to about 1e-6 relative in float32 (the
    fold is computed in float64) for well-conditioned networks. With ``example_input`` the two are
    compared, and a warning is raised when ``max |folded − original| / max |original|`` exceeds round-off:
    ``max(16 · eps · sqrt(depth), 8 · r)``, where ``eps = torch.finfo(dtype).eps``, ``depth`` counts the
    conv/linear/BN modules, and ``r`` is the original model's own round-off (its difference to a float64
    copy of itself on the same input), which covers networks that amplify every rounding error. It is an ``fx.GraphModule`` (or a copy of ``model`` in the fallback),
    for inference: folded layers no longer hold BN parameters to train.

    Args:
        model: the model; put it in eval mode first (``model.eval()``).
        report: also return the list of :class:`FoldRecord` (what went into what, and why not).
        example_input: optional input (a tuple is unpacked as ``model(*example_input)``): fixes every
            BN's input rank, and the folded output is compared with the original on it (a warning if
            they differ by more than round-off).

    Returns: the folded model, or ``(folded, records)`` with ``report=True``.

    Shape: the folded model takes and returns what ``model`` does.

    Example::

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        ...                       nn.BatchNorm1d(8 * 14 * 14), nn.Linear(8 * 14 * 14, 10)).eval()
        >>> fast, records = fold(model, report=True)
        >>> [(r.bn, r.action, r.target) for r in records]
        [('1', 'folded_into_previous', '0'), ('4', 'folded_into_next', '5')]
        >>> x = torch.randn(2, 3, 16, 16)
        >>> torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)
        True

    Reference: Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018 (BN folding); ``torch.fx.experimental.optimization.fuse``.
    """
    ranks = _observe_ranks(model, example_input) if example_input is not None else {}
    root = copy.deepcopy(model)
    records: list[FoldRecord] = []
    try:
        result: nn.Module = _fold_fx(root, records, ranks)
    except Exception as err:  # fx cannot trace (control flow on values, unsupported ops, ...)
        records.clear()
        root = copy.deepcopy(model)
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        result = _fold_sequential(root, records, msg, ranks)
    for qual, m in model.named_modules():  # batch norms that do more than batch norm: left as they are
        if bn_kind(m) == "unknown" and not any(r.bn == qual for r in records):
            why = "it is a batch norm with its own forward or child modules, which fold cannot express"
            records.append(FoldRecord(qual or "<root>", "skipped", None, f"{type(m).__name__}: {why}"))
    skipped = [r for r in records if r.action == "skipped"]
    if skipped:
        lines = "; ".join(f"'{r.bn}': {r.reason}" for r in skipped)
        warnings.warn(f"fold: {len(skipped)} BN layer(s) were left unchanged: {lines}.", stacklevel=2)
    if example_input is not None and not any(m.training for m in model.modules()):
        _check_result(model, result, example_input)
    return (result, records) if report else result
