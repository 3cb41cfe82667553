"""convert(..., fuse_activations=True): find BN → activation pairs and fuse the activation into our layer."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import _checks
from .. import activations as _activations
from ..layers.base import RANK_FUSED, BatchNorm
from ..layers.interop import mark
from .convert import bn_kind, is_bn_like

__all__ = ["FuseRecord"]  # the entry point is convert(..., fuse_activations=True)


@dataclass
class FuseRecord:
    """One BN → activation pair found by ``convert(..., fuse_activations=True)``.

    ``bn`` is the qualified name of the BN layer, ``activation`` describes what follows it (``"ReLU6
    module 'features.1.2'"``, ``"function torch.nn.functional.relu"``, ``"method relu_"``), ``action`` is
    ``"fused"`` or ``"skipped"`` and ``reason`` says how or why not.
    """

    bn: str
    activation: str
    action: str
    reason: str


@dataclass
class _Pair:
    bn_node: fx.Node | None
    act_node: fx.Node | None
    bn_name: str
    act_label: str
    name: str  # table name of the activation
    slope: float
    act_module: str | None  # qualified name when the activation is a module
    local: bool = False  # the activation module is called at this one place only: replace it by nn.Identity


class _Skip(Exception):
    pass


# -- which fx nodes are activations (all read from batchnorm.activations.TABLE) ----------------------
def _by_function() -> dict:
    out = {}
    for a in _activations.TABLE.values():
        for f in a.functions:
            out[f] = a.name
    return out


def _by_method() -> dict[str, str]:
    """Tensor methods with the name of one of the table's functions (``x.relu()``, ``x.relu_()``, ``x.tanh()``)."""
    out: dict[str, str] = {}
    for a in _activations.TABLE.values():
        for f in a.functions:
            base = getattr(f, "__name__", "").rstrip("_")
            for name in (base, base + "_"):
                if base and hasattr(torch.Tensor, name):
                    out[name] = a.name
    return out


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_method":
        return f"method {node.target}"
    target = node.target
    mod = getattr(target, "__module__", None) or "torch"
    return f"function {mod}.{getattr(target, '__name__', target)}"


def _function_slope(node: fx.Node, name: str) -> float:
    """negative_slope of a functional call, checking that every other argument keeps the fused form."""
    fn = node.target
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        params = list(bound.arguments.items())[1:]  # after the input
    except (TypeError, ValueError):  # builtins such as torch.relu or F.gelu: keyword arguments only
        if len(node.args) > 1:
            raise _Skip(f"{_label(node)} is called with positional arguments that cannot be checked") from None
        params = list(node.kwargs.items())
    slope = 0.01
    for key, value in params:
        if isinstance(value, fx.Node):
            raise _Skip(f"its argument {key}= is computed in the forward, not a constant")
        if key == "inplace":
            continue  # fusing removes the call; in-place or not, the values are the same
        if key == "negative_slope" and name == "leaky_relu":
            slope = float(value)
        elif key == "approximate" and value == "none":
            continue
        else:
            raise _Skip(f"{_label(node)} with {key}={value!r} is not the form the kernels fuse")
    return slope


def _activation_of(node: fx.Node, modules: dict[str, nn.Module], functions: dict, methods: dict):
    """``(table name, negative_slope)`` if ``node`` applies a fusable activation to its first argument;
    None if it is no activation at all; raises _Skip for an activation in a form the kernels do not fuse."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if module is None:
            return None
        found = _activations.from_module(module)
        if found is None:
            kinds = tuple(c for a in _activations.TABLE.values() if a.name != "identity" for c in a.modules)
            if isinstance(module, kinds):
                raise _Skip(f"{module!r} is not one of the forms the kernels fuse (see batchnorm.activations)")
            return None
        if len(node.args) != 1 or node.kwargs:
            raise _Skip(f"{_label(node)} is called with extra arguments")
        if module._forward_hooks or module._forward_pre_hooks:
            raise _Skip(f"{_label(node)} has forward hooks, which would no longer run")
        return found
    if node.op == "call_function" and node.target in functions:
        name = functions[node.target]
        return name, _function_slope(node, name)
    if node.op == "call_method" and node.target in methods:
        if len(node.args) != 1 or node.kwargs:
            raise _Skip(f"{_label(node)} is called with extra arguments")
        return methods[node.target], 0.01
    return None


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.kwargs.get("inplace") is True:
        return True
    return getattr(node.target, "__name__", "").endswith("_")


# -- finding the pairs --------------------------------------------------------------------------------
def _find_pairs(graph: fx.Graph, root: nn.Module, records: list[FuseRecord]) -> list[_Pair]:
    modules = dict(root.named_modules())
    functions, methods = _by_function(), _by_method()
    order = {n: i for i, n in enumerate(graph.nodes)}
    calls: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1
    in_tree: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        in_tree[id(m)] = in_tree.get(id(m), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or bn_kind(modules[node.target]) not in ("bn", "act"):
            continue
        bn = modules[node.target]
        found = []  # (user, (name, slope) or _Skip)
        for user in node.users:
            if not user.args or user.args[0] is not node:
                continue
            try:
                act = _activation_of(user, modules, functions, methods)
            except _Skip as why:
                act = why
            if act is not None:
                found.append((user, act))
        if not found:
            continue  # no activation follows this BN: not a pair
        user, act = found[0]
        label = _label(user)
        if user.op == "call_module":
            label = f"{type(modules[user.target]).__name__} {label}"
        try:
            if bn_kind(bn) == "act":
                raise _Skip(f"{type(bn).__name__} applies its own drop/act modules after normalizing; a fused "
                            "activation would run before them")
            if isinstance(act, _Skip):
                raise act
            if len(found) > 1:
                raise _Skip(f"its output feeds {len(found)} activations")
            others = [u for u in node.users if u is not user]
            if others:
                # an in-place activation that runs before every other use: those uses see activated values
                if not (_is_inplace(user, modules) and all(order[u] > order[user] for u in others)):
                    names = ", ".join(sorted(str(u.name) for u in others))
                    raise _Skip(f"its output is also used by {names} (not only by the activation); fusing would "
                                "change what those see")
            if not isinstance(bn, BatchNorm) or not hasattr(bn, "activation"):
                raise _Skip(f"{type(bn).__name__} has no fused activation (convert it to batchnorm.BatchNorm or a variant)")
            if bn.activation not in (None, "identity"):
                raise _Skip(f"it already applies activation={bn.activation!r}")
            if calls.get(id(bn), 0) != 1:
                raise _Skip(f"the layer is called at {calls.get(id(bn), 0)} places in the forward; fusing would add "
                            "the activation at every one of them")
            name, slope = act
            try:
                _checks.check_activation(name, slope, getattr(bn, "memory", "default"), type(bn).__name__)
            except (ValueError, TypeError) as err:
                raise _Skip(str(err)) from None
        except _Skip as why:
            records.append(FuseRecord(node.target, label, "skipped", str(why)))
            continue
        act_module = user.target if user.op == "call_module" else None
        local = act_module is not None and calls.get(id(modules[act_module]), 0) == 1 and in_tree.get(
            id(modules[act_module]), 0) == 1
        pairs.append(_Pair(node, user, node.target, label, name, slope, act_module, local))
    return pairs


def _set_activation(bn: nn.Module, name: str, slope: float) -> None:
    bn.activation = name
    bn.negative_slope = float(slope)
    twin = RANK_FUSED.get(type(bn))
    if twin is not None:  # BatchNorm1d/2d/3d are torch's classes too, which have no activation: the non-torch twin
        bn.__class__ = twin
    mark(bn)  # torch's SyncBatchNorm built on its tensors would now drop the activation: refused (layers/interop)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _trace_in_mode(root: nn.Module, tracer_cls, training: bool | None) -> fx.Graph:
    """Trace with every module in training (True) or evaluation (False) mode, or as it is (None)."""
    if training is None:
        return tracer_cls().trace(root)
    flags = {m: m.training for m in root.modules()}
    try:
        root.train(training)
        return tracer_cls().trace(root)
    finally:
        for m, flag in flags.items():
            m.training = flag


def _graft(src: nn.Module, dst: nn.Module) -> None:
    """Give the GraphModule every parameter, buffer and submodule of the model that the graph does not
    reference (modules the forward never calls, ...), so its state_dict has the model's keys."""
    for name, p in src._parameters.items():
        if p is not None and name not in dst._parameters and not hasattr(dst, name):
            dst.register_parameter(name, p)
    for name, b in src._buffers.items():
        if b is not None and name not in dst._buffers and not hasattr(dst, name):
            dst.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)
    for name, child in src._modules.items():
        if child is None:
            continue
        mine = dst._modules.get(name)
        if mine is None and not hasattr(dst, name):
            dst.add_module(name, child)
        elif mine is not None and mine is not child:
            _graft(child, mine)


def fuse_activations(root: nn.Module, records: list[FuseRecord]) -> nn.Module:
    """Fuse every provably safe BN → activation pair of ``root`` (changed in place, or returned as a
    GraphModule); one :class:`FuseRecord` per pair found is appended to ``records``."""
    from .fold import _Tracer  # BN-like layers and our other layers as leaves

    try:
        graph = _trace_in_mode(root, _Tracer, None)
        others = [_trace_in_mode(root, _Tracer, mode) for mode in (True, False)]
    except Exception as err:  # fx cannot trace (control flow on values, ...): adjacent pairs in nn.Sequential
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return _fuse_sequential(root, records, msg)
    pairs = _find_pairs(graph, root, records)
    code = graph.python_code("self").src
    if any(g.python_code("self").src != code for g in others):
        # the forward branches on self.training: a pair counts only if it is safe on every path, and only
        # module replacements (no rewritten forward) can serve both modes
        safe_everywhere = None
        for g in others:
            names = {(p.bn_name, p.act_label) for p in _find_pairs(g, root, []) if p.local}
            safe_everywhere = names if safe_everywhere is None else safe_everywhere & names
        for p in pairs:
            if p.local and (p.bn_name, p.act_label) in safe_everywhere:
                _fuse_local(root, p, records)
            else:
                records.append(FuseRecord(
                    p.bn_name, p.act_label, "skipped",
                    "the forward takes other paths in training and in evaluation mode (it branches on "
                    "self.training), and this pair is not safe on both or would need a rewritten forward "
                    "(the activation is a function call or a module called at several places)",
                ))
        return root
    if all(p.local for p in pairs):
        for p in pairs:
            _fuse_local(root, p, records)
        return root
    for p in pairs:
        _set_activation(root.get_submodule(p.bn_name), p.name, p.slope)
        p.act_node.replace_all_uses_with(p.bn_node)
        graph.erase_node(p.act_node)
        where = "a module also called elsewhere" if p.act_module else "a function call"
        records.append(FuseRecord(p.bn_name, p.act_label, "fused",
                                  f"activation={p.name!r} fused; the call ({where}) was removed from the traced "
                                  "forward, so the model is returned as a torch.fx.GraphModule"))
    graph.lint()
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    _graft(root, gm)
    for name, m in root.named_modules():  # each module keeps its own train/eval mode
        try:
            gm.get_submodule(name).training = m.training
        except AttributeError:
            pass
    return gm


def _fuse_local(root: nn.Module, p: _Pair, records: list[FuseRecord]) -> None:
    _set_activation(root.get_submodule(p.bn_name), p.name, p.slope)
    _set_submodule(root, p.act_module, nn.Identity())
    records.append(FuseRecord(p.bn_name, p.act_label, "fused",
                              f"activation={p.name!r} fused; the activation module (called only here) became "
                              "nn.Identity"))


def _fuse_sequential(root: nn.Module, records: list[FuseRecord], error: str) -> nn.Module:
    """Without a graph: BN → activation modules adjacent in a plain nn.Sequential, each in the model once."""
    occurrences: dict[int, int] = {}
    for _, m in root.named_modules(remove_duplicate=False):
        occurrences[id(m)] = occurrences.get(id(m), 0) + 1
    names = {id(m): n for n, m in root.named_modules()}
    seen: set[str] = set()
    for seq_name, seq in list(root.named_modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue  # a subclass with its own forward may use its children in any order
        keys = list(seq._modules.keys())
        for i in range(len(keys) - 1):
            bn, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]
            if bn is None or act is None or not is_bn_like(bn):
                continue
            found = _activations.from_module(act)
            if found is None:
                continue
            qual = names[id(bn)]
            label = f"{type(act).__name__} module '{names[id(act)]}'"
            seen.add(qual)
            name, slope = found
            why = None
            if not isinstance(bn, BatchNorm) or not hasattr(bn, "activation"):
                why = f"{type(bn).__name__} has no fused activation"
            elif bn.activation not in (None, "identity"):
                why = f"it already applies activation={bn.activation!r}"
            elif occurrences.get(id(bn), 0) != 1 or occurrences.get(id(act), 0) != 1:
                why = "the layer or the activation appears at more than one place of the model"
            elif act._forward_hooks or act._forward_pre_hooks:
                why = "the activation module has forward hooks, which would no longer run"
            else:
                try:
                    _checks.check_activation(name, slope, getattr(bn, "memory", "default"), type(bn).__name__)
                except (ValueError, TypeError) as err:
                    why = str(err)
            if why is not None:
                records.append(FuseRecord(qual, label, "skipped", why))
                continue
            _set_activation(bn, name, slope)
            seq._modules[keys[i + 1]] = nn.Identity()
            records.append(FuseRecord(qual, label, "fused",
                                      f"adjacent in nn.Sequential '{seq_name}' (fx could not trace the model: {error})"))
    for qual, m in root.named_modules():
        if is_bn_like(m) and qual not in seen:
            records.append(FuseRecord(qual, "unknown", "skipped",
                                      f"fx could not trace the model ({error}); without a graph only BN → activation "
                                      "modules adjacent inside an nn.Sequential are fused"))
    return root
