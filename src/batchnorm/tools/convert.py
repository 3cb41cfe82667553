"""convert / freeze / unfreeze: swap every BN-like layer of a model for another class, on a copy."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import activations as _activations
from ..layers.base import RANK_FUSED, BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.frozen import FrozenBatchNorm
from ..layers.interop import TORCH_FORWARDS, _ModulesAfter, with_modules

__all__ = ["convert", "freeze", "unfreeze", "is_bn_like", "bn_axis", "bn_kind", "after_modules", "bn_features",
           "is_frozen", "unknown_error"]

_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_TORCH_FORWARDS = TORCH_FORWARDS  # torch's forwards (SyncBatchNorm's with and without interop's check)
#: classes known to be batch norm followed by their own ``drop`` and ``act`` children (timm 1.0)
_ACT_CLASSES = ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
#: the children of an ``"act"`` layer, in the order its forward applies them after normalizing
ACT_CHILDREN = ("drop", "act")
_RANKS = ((nn.BatchNorm1d, BatchNorm1d), (nn.BatchNorm2d, BatchNorm2d), (nn.BatchNorm3d, BatchNorm3d))


def _foreign_frozen(m: nn.Module) -> bool:
    """torchvision's / detectron2's / timm's ``FrozenBatchNorm2d`` (and timm's ``FrozenBatchNormAct2d``): not a
    ``_BatchNorm``; recognized by class name and the four buffers, with no parameters."""
    return ("FrozenBatchNorm" in type(m).__name__ and not isinstance(m, (_BatchNorm, FrozenBatchNorm))
            and all(isinstance(m._buffers.get(k), torch.Tensor) for k in _BUFFERS) and not m._parameters)


def bn_kind(module: nn.Module) -> str | None:
    """How the tools see ``module``: None (not batch norm), ``"bn"``, ``"act"`` or ``"unknown"``.

    ``"bn"``: batch norm and nothing else: torch's ``BatchNorm1d/2d/3d``/``SyncBatchNorm`` and ``_BatchNorm``
    subclasses that keep torch's ``forward`` and have no child modules; every layer of ours; ``FrozenBatchNorm``;
    torchvision's/detectron2's/timm's ``FrozenBatchNorm2d`` (four buffers, no parameters). ``"act"``: batch norm
    followed by its own ``drop`` and ``act`` children (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``,
    ``FrozenBatchNormAct2d``; ours from :func:`batchnorm.layers.interop.with_modules`). ``"unknown"``: a
    ``_BatchNorm`` subclass (or a frozen-BN-like module) with its own ``forward`` or other children, which no
    tool can carry: each refuses it with an error naming it (fold and recalibrate leave it as it is, recorded).

    Shape: not applicable. Example: ``bn_kind(torch.nn.BatchNorm2d(4))`` is ``"bn"``.
    """
    children = set(module._modules)
    if isinstance(module, _ModulesAfter):
        return "act"
    if isinstance(module, (BatchNorm, FrozenBatchNorm)):
        return "bn"
    frozen = _foreign_frozen(module)
    if not (isinstance(module, _BatchNorm) or frozen):
        return None
    if any(c.__name__ in _ACT_CLASSES for c in type(module).__mro__) and children <= {"act", "drop"}:
        return "act"
    if children:
        return "unknown"
    if frozen:
        return "bn" if "Act" not in type(module).__name__ else "unknown"
    return "bn" if type(module).forward in _TORCH_FORWARDS else "unknown"


def after_modules(module: nn.Module) -> list[nn.Module]:
    """The child modules an ``"act"`` layer (:func:`bn_kind`) applies after normalizing, in order (``drop``, then
    ``act``), ``nn.Identity`` included; ``[]`` for every other kind. The input of the first of them is what the
    normalization itself computed (timm's ``act(drop(batch_norm(x)))``; ours from ``with_modules`` likewise), which
    is where the tools and the diagnostics observe or cut an ``"act"`` layer.

    Shape: not applicable. Example: ``after_modules(zoo.BatchNormAct2d(4))`` is ``[Identity(), ReLU(inplace=True)]``.
    """
    if bn_kind(module) != "act":
        return []
    return [module._modules[k] for k in ACT_CHILDREN if module._modules.get(k) is not None]


def bn_features(module: nn.Module) -> int:
    """C of a BN-like layer: ``num_features``, or the length of its running mean / weight (torchvision's
    ``FrozenBatchNorm2d`` keeps no ``num_features``)."""
    c = getattr(module, "num_features", None)
    if isinstance(c, int):
        return c
    for name in ("running_mean", "weight"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            return int(t.shape[0])
    raise ValueError(f"{type(module).__name__} has neither num_features nor a running_mean/weight to count features.")


def is_bn_like(module: nn.Module) -> bool:
    """True for a module that is batch norm and nothing else (:func:`bn_kind` ``"bn"``): torch's
    ``BatchNorm1d/2d/3d``/``SyncBatchNorm``, every layer of ours, :class:`batchnorm.FrozenBatchNorm` and
    torchvision's/detectron2's ``FrozenBatchNorm2d``. Layers that apply more (timm's ``BatchNormAct2d``) are not."""
    return bn_kind(module) == "bn"


def is_frozen(m: nn.Module) -> bool:
    """A frozen batch norm of any library (ours, torchvision's/detectron2's/timm's ``FrozenBatchNorm2d`` and
    ``FrozenBatchNormAct2d``): fixed statistics, no training mode of its own."""
    return isinstance(m, FrozenBatchNorm) or _foreign_frozen(m)


_is_frozen = is_frozen


def bn_axis(module: nn.Module) -> int:
    """The feature axis of a BN-like layer as written on it (torch's layers: 1)."""
    return int(getattr(module, "axis", 1))


def unknown_error(m: nn.Module, label: str, tool: str, consequence: str | None = None) -> ValueError:
    """The error every tool raises for a :func:`bn_kind` ``"unknown"`` layer (``label`` e.g. ``"layer 'a.b'"``;
    ``consequence`` what would go wrong, by default that the tool would change the model's outputs)."""
    own = "its own forward" if type(m).forward not in _TORCH_FORWARDS else ""
    kids = ", ".join(m._modules) if m._modules else ""
    what = " and ".join(x for x in (own, f"child modules ({kids})" if kids else "") if x)
    consequence = consequence or f"{tool} cannot carry what it computes and would change the model's outputs"
    return ValueError(
        f"{tool}: {label} ({type(m).__module__}.{type(m).__name__}) is a batch norm that does more than batch norm "
        f"({what}), so {consequence}. Replace it by hand (e.g. with batchnorm.BatchNorm plus the extra modules after "
        "it), or apply the tool to the submodules without it."
    )


_unknown_error = unknown_error


_NOT_CARRIED = {"device", "dtype", "num_features"}


def _source_config(m: nn.Module) -> dict:
    if _is_frozen(m):
        return {"num_features": int(m.running_mean.shape[0]), "eps": float(m.eps), "affine": True,
                "track_running_stats": True, "axis": bn_axis(m)}
    cfg = {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        # build with buffers whenever the source has them; the flag itself is restored afterwards
        "track_running_stats": getattr(m, "running_mean", None) is not None,
        "axis": bn_axis(m),
    }
    if m.affine and getattr(m, "bias", None) is None:
        cfg["bias"] = False  # affine=True, bias=False (weight only)
    return cfg


def _tensor_of(m: nn.Module) -> torch.Tensor | None:
    for name in ("weight", "running_mean", "bias", "running_var"):
        t = getattr(m, name, None)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _extras(m: nn.Module) -> tuple[nn.Module | None, nn.Module | None, tuple[str, float] | None]:
    """``(act, drop, fusable)`` of a source layer: its activation (a module; our fused one as a fresh module), its
    drop module (None: none or Identity), and ``(name, slope)`` when the two amount to one fused activation."""
    if bn_kind(m) == "act":
        act, drop = m._modules.get("act"), m._modules.get("drop")
        act = None if act is None or type(act) is nn.Identity else act
        drop = None if drop is None or type(drop) is nn.Identity else drop
    else:
        name = getattr(m, "activation", None)
        act = None if name in (None, "identity") else _activations.to_module(name, getattr(m, "negative_slope", 0.01))
        drop = None
    fusable = _activations.from_module(act) if act is not None and drop is None else None
    return act, drop, fusable


def _target(m: nn.Module, to: type) -> type:
    """``to``, except that a torch ``BatchNorm1d/2d/3d`` converted to BatchNorm becomes our class of that rank
    (an instance of torch's class too: docs/ecosystem.md)."""
    if to is BatchNorm and bn_axis(m) == 1:
        for theirs, ours in _RANKS:
            if isinstance(m, theirs):
                return ours
    return to


def _build(m: nn.Module, name: str, to: type, kwargs: dict) -> nn.Module:
    label = f"layer '{name}'" if name else "the model"
    kind = bn_kind(m)
    if kind == "unknown":
        raise _unknown_error(m, label, "convert")
    act, drop, fusable = _extras(m)
    to = _target(m, to)
    ours = isinstance(to, type) and issubclass(to, (BatchNorm, FrozenBatchNorm))
    if act is not None or drop is not None:
        fuses = issubclass(to, BatchNorm) and "activation" in _accepted(to) and "activation" not in kwargs
        if fusable is not None and fuses:  # (BatchNorm1d/2d/3d then build their non-torch twin: layers.base)
            kwargs = {**kwargs, "activation": fusable[0], "negative_slope": fusable[1]}
        elif ours:
            to = with_modules(RANK_FUSED.get(to, to))
            kwargs = {**kwargs, "activation": None} if "activation" in _accepted(to) else kwargs
    new = _build_layer(m, name, label, to, kwargs)
    holds = isinstance(new._modules.get("act"), nn.Module) or isinstance(new, _ModulesAfter)
    if holds:  # a class that applies its own act/drop children (ours from with_modules, timm's BatchNormAct2d)
        fused_here = getattr(new, "activation", None) not in (None, "identity")
        new.act = nn.Identity() if act is None or fused_here else act
        new.drop = nn.Identity() if drop is None else drop
    elif (act is not None and getattr(new, "activation", None) in (None, "identity")) or (
            drop is not None and not holds):
        what = f"activation {type(act).__name__}" if act is not None else ""
        what += (" and " if what and drop is not None else "") + (f"drop layer {type(drop).__name__}" if drop else "")
        fused = getattr(m, "activation", None)
        what = f"has a fused activation={fused!r}" if fused not in (None, "identity") else f"applies {what} after normalizing"
        raise ValueError(
            f"convert: {label} ({type(m).__name__}) {what}, but {to.__name__} takes no activation argument and has no "
            "act/drop modules, so the converted model would compute something else. Convert it to a batchnorm layer "
            "(which fuses the activation or keeps it as a module after the layer), or to a class with its own act "
            "and drop modules (timm's BatchNormAct2d)."
        )
    return new


def _build_layer(m: nn.Module, name: str, label: str, to: type, kwargs: dict) -> nn.Module:
    cfg = _source_config(m)
    try:
        params = inspect.signature(to).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        params = {}
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_var_kw and issubclass(to, BatchNorm):  # a variant passing **options on to BatchNorm
        params = {**inspect.signature(BatchNorm).parameters, **params}
    accepts = lambda key: not params or takes_var_kw or key in params  # noqa: E731
    if cfg["axis"] != 1 and not accepts("axis"):
        raise ValueError(
            f"convert: {label} ({type(m).__name__}) normalizes feature axis {cfg['axis']}, but {to.__name__} has no "
            "axis argument (it always normalizes axis 1). Convert it to a batchnorm layer (e.g. batchnorm.BatchNorm), "
            "which keeps axis=, or move the feature axis to position 1 in the model."
        )
    if to is FrozenBatchNorm or (isinstance(to, type) and issubclass(to, FrozenBatchNorm)):
        if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
            raise ValueError(
                f"convert: {label} ({type(m).__name__}) has no running statistics (track_running_stats=False), so it "
                "cannot become a FrozenBatchNorm, which needs them. Leave it out of the conversion, or train it with "
                "track_running_stats=True (or recalibrate it with batchnorm.recalibrate) first."
            )
        cfg.pop("momentum", None)
        cfg.pop("affine", None)
        cfg.pop("track_running_stats", None)
    ref = _tensor_of(m)
    factory = {}
    if ref is not None:
        factory = {"device": ref.device, "dtype": ref.dtype}
    args = {k: v for k, v in cfg.items() if accepts(k) and not (k == "bias" and not params)}
    # options of `to` that the source layer also has (activation, virtual_batch_size, r_max, process_group, ...)
    for key, p in params.items():
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or key in args or key in kwargs or key in _NOT_CARRIED:
            continue
        if hasattr(m, key) and not callable(getattr(m, key)) and not isinstance(getattr(m, key), torch.Tensor):
            args[key] = getattr(m, key)
    args.update({k: v for k, v in factory.items() if accepts(k)})
    args.update(kwargs)
    num_features = args.pop("num_features")
    new = to(num_features, **args)
    if cfg.get("bias") is False and isinstance(new, BatchNorm) and new.bias is not None:
        new.register_parameter("bias", None)  # a variant without a bias= argument: drop β as the source had none
    if ref is not None:
        new = new.to(device=ref.device)
    _carry_state(m, new)
    if hasattr(new, "track_running_stats") and hasattr(m, "track_running_stats"):
        new.track_running_stats = m.track_running_stats  # switched off after construction: stays off
    new.train(m.training)
    return new


def _carry_state(src: nn.Module, dst: nn.Module) -> None:
    """Copy weight, bias, running statistics and num_batches_tracked (values, and requires_grad of parameters)."""
    src_frozen = _is_frozen(src)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            s = getattr(src, name, None)
            d = getattr(dst, name, None)
            if not isinstance(s, torch.Tensor) or not isinstance(d, torch.Tensor):
                continue
            if tuple(s.shape) != tuple(d.shape):
                raise ValueError(
                    f"convert: cannot carry '{name}' of shape {tuple(s.shape)} into {type(dst).__name__}, whose "
                    f"'{name}' has shape {tuple(d.shape)}. Do not override num_features when converting."
                )
            d.copy_(s.to(dtype=d.dtype, device=d.device))
            if isinstance(d, nn.Parameter) and isinstance(s, nn.Parameter) and not src_frozen:
                d.requires_grad_(s.requires_grad)
    # an affine=False source into FrozenBatchNorm: its weight 1, bias 0 buffers give the same map


def _convert(model: nn.Module, to: type, kwargs: dict, select: Callable[[nn.Module], bool]) -> nn.Module:
    memo: dict[int, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if select(module):
            new = _build(module, prefix, to, kwargs)
            memo[id(module)] = new
            return new
        memo[id(module)] = module
        for child_name, child in list(module._modules.items()):  # not named_children(): it hides repeats
            if child is None:
                continue
            replacement = visit(child, f"{prefix}.{child_name}" if prefix else child_name)
            if replacement is not child:
                setattr(module, child_name, replacement)
        return module

    return visit(copy.deepcopy(model), "")


def convert(model: nn.Module, to: type = BatchNorm, *, fuse_activations: bool = False, report: bool = False,
            **kwargs):
    """Return a copy of ``model`` with every BN-like layer replaced by ``to`` (the original is untouched).

    Replaced: ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` (every ``_BatchNorm``), every
    layer of ours (:class:`~batchnorm.BatchNorm`, its variants, :class:`~batchnorm.FrozenBatchNorm`),
    torchvision's/detectron2's ``FrozenBatchNorm2d``, and batch norms that apply more (:func:`bn_kind`):
    timm's ``BatchNormAct2d``/``SyncBatchNormAct``/``FrozenBatchNormAct2d`` are converted with everything they
    do — the activation becomes the fused ``activation=`` when :data:`batchnorm.activations.TABLE` has it and no
    drop layer is set, otherwise the layer is built as :func:`~batchnorm.layers.interop.with_modules` of ``to``
    (our layer, then the same ``drop`` and ``act`` modules); a ``to`` that can express neither raises ValueError
    naming the layer. A ``_BatchNorm`` subclass with its own ``forward`` or other children is refused
    (ValueError naming it), never simplified. ``to`` is one of our classes, torch's (``torch.nn.BatchNorm2d``,
    ``torch.nn.SyncBatchNorm``, ...) or one with its own ``act``/``drop`` children (timm's ``BatchNormAct2d``:
    they are set from the source, ``nn.Identity`` where it has none). With ``to=BatchNorm`` a torch
    ``BatchNorm1d/2d/3d`` becomes :class:`~batchnorm.BatchNorm1d`/``2d``/``3d``, which are instances of torch's
    classes too (docs/ecosystem.md).

    Carried over: ``num_features, eps, momentum, affine, track_running_stats, axis, bias`` (as far as ``to``
    accepts them; ``kwargs`` override them, e.g. ``process_group=`` or a variant's own settings),
    every other argument of ``to`` that the source layer has as an attribute of the same name (e.g.
    ``activation``, ``virtual_batch_size``, ``r_max``, ``process_group``), ``weight``, ``bias`` and their
    ``requires_grad``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``, the train/eval mode, the device and the dtype. A FrozenBatchNorm source
    becomes a trainable layer with ``weight``/``bias`` from its buffers (``requires_grad=True``),
    ``num_batches_tracked = 0`` and ``momentum`` from ``kwargs`` (default of ``to``). A layer shared
    at several places of the model stays shared. A variant's own extra state (e.g. its settings) is
    not carried when ``to`` has no such argument (pass it in ``kwargs``); a fused activation that ``to``
    cannot express is a ValueError rather than a silent change. Forward hooks on replaced layers are not
    carried.

    ``fuse_activations=True`` then finds every BN → activation pair (the activations of
    :data:`batchnorm.activations.TABLE`: ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``, ``nn.SiLU``,
    ``nn.GELU()`` (erf form), ``nn.Sigmoid``, ``nn.Tanh``, ``inplace=True`` or not, as modules, as
    functions such as ``F.relu``/``torch.relu`` or as tensor methods such as ``x.relu_()``) in the
    ``torch.fx`` graph of the converted model and fuses the activation into the layer
    (``activation=...``) when that provably computes the same: the BN output feeds only the activation
    (or an in-place activation runs before every other use), the layer is called once, and the pair is
    the same in training and evaluation mode. An activation module called only there becomes
    ``nn.Identity`` and the model keeps its class; when a call must be removed from the forward (a
    functional activation, a module called at several places such as torchvision's
    ``BasicBlock.relu``), the model is returned as a ``torch.fx.GraphModule`` with the same state-dict
    keys. Pairs that are not provably safe are left alone and recorded. Models that fx cannot trace:
    only BN → activation modules adjacent inside a plain ``nn.Sequential`` are fused. ``report=True``
    returns ``(model, records)``, one :class:`~batchnorm.tools.fuse.FuseRecord` per pair
    (``action`` ``"fused"``/``"skipped"`` and the reason). After fusing, the output of a fused layer
    (seen by hooks on it) includes the activation.

    Raises ValueError when a layer cannot be represented by ``to``: ``axis != 1`` or a fused activation
    into a torch class, or ``track_running_stats=False`` into FrozenBatchNorm; and for
    ``fuse_activations=True`` with a ``to`` that has no ``activation=`` argument.

    Shape: no effect on shapes. Note that torch's ``BatchNorm1d/2d/3d`` check the input rank, so
    ``to=torch.nn.BatchNorm2d`` only suits models whose BN layers all see 4-D inputs.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> ours = convert(model, to=BatchNorm)
        >>> type(ours[1]).__module__, type(model[1]).__module__   # the original is untouched
        ('batchnorm.layers.base', 'torch.nn.modules.batchnorm')
        >>> isinstance(ours[1], torch.nn.BatchNorm2d)              # our BatchNorm2d is torch's class too
        True
        >>> back = convert(ours, to=torch.nn.BatchNorm2d)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> torch.allclose(back(x), model(x), atol=1e-6)
        True

        >>> block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True))
        >>> fused, records = convert(block, fuse_activations=True, report=True)
        >>> fused[1].activation, type(fused[2]).__name__, [r.action for r in records]
        ('relu', 'Identity', ['fused'])

    Reference: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and timm's
    ``freeze_batch_norm_2d`` (the recursive converter pattern); activation fusion as in
    ``torch.ao.quantization.fuse_modules`` (conv-BN-ReLU) and In-Place ABN (Rota Bulò et al., CVPR 2018).
    """
    if not isinstance(to, type) or not issubclass(to, nn.Module):
        raise TypeError(
            f"convert expected `to` to be an nn.Module class such as batchnorm.BatchNorm or torch.nn.BatchNorm2d, "
            f"got {to!r}. Pass the class itself, not an instance."
        )
    if fuse_activations and not (issubclass(to, BatchNorm) and "activation" in _accepted(to)):
        raise ValueError(
            f"convert: fuse_activations=True needs a target layer with a fused activation (activation=), but "
            f"{to.__name__} has none. Use to=batchnorm.BatchNorm (or one of its variants), or fuse_activations=False."
        )
    out = _convert(model, to, kwargs, bn_kind)
    records: list = []
    if fuse_activations:
        from .fuse import fuse_activations as _fuse

        out = _fuse(out, records)
    return (out, records) if report else out


def _accepted(to: type) -> set[str]:
    """Argument names ``to`` accepts (BatchNorm's too for a variant that passes ``**options`` on)."""
    params = dict(inspect.signature(to).parameters)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        params.update(inspect.signature(BatchNorm).parameters)
    return set(params)


def freeze(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with every BN-like layer replaced by a :class:`~batchnorm.FrozenBatchNorm`.

    Each becomes the fixed map ``y = x · γ/sqrt(σ²_run + ε) + (β − μ_run · γ/sqrt(σ²_run + ε))``: its
    eval-mode output, in training and evaluation alike; nothing is learned or updated any more.
    Layers without running statistics raise ValueError (see :func:`convert`).

    Shape: unchanged.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8)).eval()
        >>> frozen = freeze(model)
        >>> type(frozen[1]).__name__, len(list(frozen.parameters()))    # only the Linear learns
        ('FrozenBatchNorm', 2)

    Reference: torchvision/detectron2 ``FrozenBatchNorm2d``; timm ``freeze_batch_norm_2d``.
    """
    return _convert(model, FrozenBatchNorm, {}, bn_kind)


def unfreeze(model: nn.Module, to: type = BatchNorm, **kwargs) -> nn.Module:
    """Copy of ``model`` with every :class:`~batchnorm.FrozenBatchNorm` replaced by ``to`` (default BatchNorm).

    The new layers have trainable ``weight``/``bias`` (from the frozen buffers), the frozen running
    statistics, ``num_batches_tracked = 0``, and the mode of the frozen layer; other layers are not
    touched. ``unfreeze(freeze(m))`` gives the same eval outputs as ``m``.

    Shape: unchanged.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), FrozenBatchNorm(8))
        >>> thawed = unfreeze(model)
        >>> type(thawed[1]).__name__, thawed[1].weight.requires_grad
        ('BatchNorm', True)

    Reference: timm ``unfreeze_batch_norm_2d``.
    """
    return _convert(model, to, kwargs, _frozen_kind)


def _frozen_kind(m: nn.Module) -> bool:
    """A frozen layer of any library, with or without act/drop modules (refused when it does something unknown)."""
    base = m._base if isinstance(m, _ModulesAfter) else type(m)
    if issubclass(base, FrozenBatchNorm) or _foreign_frozen(m):
        return True
    return False
