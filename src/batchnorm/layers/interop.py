"""Torch's batch-norm utilities, made exact for our layers (issue 12, item 2; decisions in docs/ecosystem.md).

Our :class:`~batchnorm.BatchNorm` family subclasses ``torch.nn.modules.batchnorm._BatchNorm``, so the
code that finds batch norms by ``isinstance`` finds ours. Three of torch's utilities would then
*build* something from our layer that only knows torch's options (feature axis 1, no fused activation,
no ghost batches, no renormalization) and would silently compute something else for those layers.
:func:`install` (run once when :mod:`batchnorm` is imported) wraps exactly these entry points; the
wrappers only act on our layers and hand every other module to torch's original code unchanged:

* ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` — our layers become :class:`batchnorm.SyncBatchNorm`
  with the same options (axis, activation, memory, backend) and the *same* parameter and buffer
  objects (as torch does, so an optimizer built before still works); ``GhostBatchNorm``,
  ``BatchRenorm`` and other subclasses, which have no synchronized form, raise ``ValueError``;
* ``torch.nn.utils.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` (also reachable as
  ``torch.nn.utils.fusion.*``) — refuse, with ``ValueError``, a layer whose fused activation the
  folded conv would drop, or whose feature axis is not the conv's channel axis / the linear's output axis;
* ``torch.ao.quantization.fuse_modules`` — fuser methods registered for ``(Conv1d/2d/3d, ours)``,
  ``(Conv*, ours, ReLU)`` and ``(Linear, ours)``: eval mode folds (keeping a fused activation as a
  module after the folded conv); quantization-aware training needs torch's BN (clear error);
* ``torch.nn.SyncBatchNorm.forward`` — refuses (``RuntimeError``) to run on the parameters or running
  statistics of one of our layers that torch's class cannot express (a fused activation, a feature axis other
  than 1, ghost batches, renormalization, act/drop modules). Converters that rebuild ``torch.nn.SyncBatchNorm``
  from torch's attributes and share the tensors (timm's ``convert_sync_batchnorm``) would drop those silently;
  our layers mark their tensors (:func:`mark`) and this check reads the mark: one dict and one attribute lookup.

:func:`uninstall` restores torch's originals.
"""

from __future__ import annotations

import functools
import inspect

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _export
from .base import RANK_FUSED, BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .ghost import GhostBatchNorm
from .renorm import BatchRenorm
from .sync import SyncBatchNorm

__all__ = ["install", "uninstall", "check_foldable", "convert_to_sync", "fuser_method", "with_modules", "mark",
           "TORCH_FORWARDS"]

_OURS = (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, *RANK_FUSED.values(), SyncBatchNorm, GhostBatchNorm,
         BatchRenorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_saved: dict[str, object] = {}


# -- torch.nn.SyncBatchNorm built from our tensors (timm's convert_sync_batchnorm) ------------------------------

#: attribute set on the parameters and buffers of our layers that torch's SyncBatchNorm cannot express
MARK = "_batchnorm_not_torch"
_TORCH_SYNC_FORWARD = nn.SyncBatchNorm.__dict__["forward"]  # torch's own (interop is imported before install)


def _inexpressible(layer: nn.Module) -> tuple[str, str, int] | None:
    """``(layer label, what torch's class would drop, feature axis)``, or None when torch's class is exact."""
    d = layer.__dict__
    lost = []
    act = d.get("activation")
    if act not in (None, "identity"):
        lost.append(f"its fused activation={act!r}")
    if isinstance(layer, GhostBatchNorm):
        lost.append("its ghost batches (virtual_batch_size)")
    if isinstance(layer, BatchRenorm):
        lost.append("its renormalization (r_max, d_max)")
    if isinstance(layer, _ModulesAfter):
        lost.append("its act/drop modules")
    axis = d.get("axis", 1)
    if not lost and axis == 1:
        return None
    if axis != 1:
        lost.append(f"its feature axis {axis} (torch's class normalizes axis 1)")
    return f"batchnorm's {layer._get_name()}({d.get('num_features')})", ", ".join(lost), axis


def mark(layer: nn.Module) -> None:
    """Mark (or unmark) the parameters and buffers of our ``layer`` with what torch's SyncBatchNorm would drop.

    Called when a layer is built, moved (``_apply``) or given a fused activation (``convert(...,
    fuse_activations=True)``). The mark is a plain attribute of the tensor objects, so it travels with them into
    any module that shares them (timm's converter), through ``copy.deepcopy`` (buffers; torch re-creates
    parameters without attributes) and pickling, but not into ``state_dict()`` (detached copies).

    Shape: not applicable. Example: ``mark(BatchNorm(8, activation="relu"))``.
    """
    info = _inexpressible(layer)
    for tensors in (layer._parameters, layer._buffers):
        for t in tensors.values():
            if t is None:
                continue
            if info is None:
                if getattr(t, MARK, None) is not None:
                    delattr(t, MARK)
            else:
                setattr(t, MARK, info)


def _refuse_torch_sync(layer: nn.Module, info: tuple[str, str, int], x) -> None:
    source, lost, axis = info
    if lost == f"its feature axis {axis} (torch's class normalizes axis 1)" and getattr(x, "dim", None) is not None:
        rank = x.dim()
        if -rank <= axis < rank and axis % rank == 1:
            return  # e.g. axis=-1 on (N, C): the same axis as torch's
    raise RuntimeError(
        f"torch.nn.SyncBatchNorm({layer.num_features}) runs on the parameters and running statistics of {source}, "
        f"whose numbers torch's class cannot reproduce: it would drop {lost}. It was built from that layer by a "
        "converter that reads torch's attributes and shares the tensors (timm's convert_sync_batchnorm does). Convert "
        "with batchnorm.convert(model, to=batchnorm.SyncBatchNorm) instead (or torch.nn.SyncBatchNorm."
        "convert_sync_batchnorm, which keeps every option of our layers), then apply timm's converter if you need it "
        "for other layers."
    )


def _sync_forward(self, input):
    ref = self._buffers.get("running_mean")
    if ref is None:
        ref = self._parameters.get("weight")
    info = getattr(ref, MARK, None)
    if info is not None:
        _refuse_torch_sync(self, info, input)
    return _TORCH_SYNC_FORWARD(self, input)


# (no functools.wraps: a wrapper that claims torch's module and __wrapped__ is skipped by dynamo in training mode)
#: torch's batch-norm forwards (``_BatchNorm.forward``, ``SyncBatchNorm.forward`` with and without the check)
TORCH_FORWARDS = (_BatchNorm.forward, _TORCH_SYNC_FORWARD, _sync_forward)


def check_foldable(layer: nn.Module, bn: BatchNorm, what: str, *, keeps_activation: bool = False) -> None:
    """Raise ValueError unless folding ``bn`` into ``layer`` (a conv or linear before it) is exact.

    Rules: ``bn`` has running estimates (eval mode uses them); its feature axis is the conv's
    channel axis 1 (for a conv with weight rank ``k``, the output has rank ``k``) or the linear's last
    axis (``axis=-1``, or ``axis=1`` on a 2-D input: the last input shape seen decides, and an unseen
    layer with ``axis=1`` is taken as ``(N, C)``, as torch's fusers assume); and, unless the caller keeps
    it, no fused activation.

    Shape: no tensors are touched. Example: ``check_foldable(nn.Conv2d(3, 8, 1), BatchNorm(8), "fuse")``.
    """
    name = type(bn).__name__
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{what}: {name} has no running estimates (track_running_stats=False), so in eval mode it normalizes "
            "with batch statistics and cannot be folded into a weight. Leave it unfused."
        )
    act = getattr(bn, "activation", None)
    if act not in (None, "identity") and not keeps_activation:
        raise ValueError(
            f"{what}: {name} has a fused activation={act!r}; the folded {type(layer).__name__} would drop it. "
            "Use batchnorm.fold(model), which keeps the activation as a module after the folded layer, or "
            "torch.ao.quantization.fuse_modules (which does the same)."
        )
    shape = bn.last_input_shape
    if isinstance(layer, nn.Linear):
        rank = len(shape) if shape is not None else 2
        ok = bn.axis % rank == rank - 1 if -rank <= bn.axis < rank else False
        where = "the linear layer's output features are the last axis"
    else:
        rank = layer.weight.dim()
        ok = -rank <= bn.axis < rank and bn.axis % rank == 1
        where = f"the {type(layer).__name__}'s output channels are axis 1 of its {rank}-D output"
    if not ok:
        raise ValueError(
            f"{what}: {name} normalizes axis={bn.axis} of a {rank}-D input, but {where}; folding would scale the "
            "wrong axis. Leave this pair unfused (batchnorm.fold skips it with a reason)."
        )


def convert_to_sync(module: BatchNorm, process_group=None) -> SyncBatchNorm:
    """Our layer as :class:`batchnorm.SyncBatchNorm` with the same options and the same tensors (not copies).

    Raises ValueError for layers without a synchronized form (GhostBatchNorm, BatchRenorm, subclasses).
    Shape: unchanged. Example: ``convert_to_sync(BatchNorm(8, axis=-1))`` keeps ``axis=-1``.
    """
    if type(module) not in (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm):
        raise ValueError(
            f"torch.nn.SyncBatchNorm.convert_sync_batchnorm: {type(module).__name__} has no synchronized form "
            "(torch's conversion would drop its own statistics rule and build a plain SyncBatchNorm). Keep it "
            "per-process, or replace it knowingly: batchnorm.convert(model, to=batchnorm.SyncBatchNorm)."
        )
    ref = module.weight if module.weight is not None else module.running_mean
    new = SyncBatchNorm(
        module.num_features, module.eps, module.momentum, module.affine, True, axis=module.axis,
        process_group=process_group, bias=module.bias is not None, activation=module.activation,
        negative_slope=module.negative_slope, memory=module.memory, backend=module.backend,
        device=None if ref is None else ref.device,
    )
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            setattr(new, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = module._buffers.get(name)
    new.track_running_stats = module.track_running_stats
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def fuser_method(is_qat: bool, layer: nn.Module, bn: BatchNorm, relu: nn.Module | None = None) -> nn.Module:
    """``torch.ao.quantization.fuse_modules`` fuser for (conv or linear, our BN[, ReLU]) in eval mode.

    Returns the folded layer, followed (in an ``nn.Sequential``) by the BN's fused activation and the
    ReLU when there are any. Shape: as the pair. Example:
    ``fuse_modules(model.eval(), [["conv", "bn"]])`` with ``model.bn`` a :class:`batchnorm.BatchNorm2d`.
    """
    if layer.training != bn.training:
        raise ValueError(
            f"fuse_modules: {type(layer).__name__} and {type(bn).__name__} must both be in the same mode, got "
            f"training={layer.training} and {bn.training}. Call model.eval() (or model.train()) first."
        )
    if is_qat or bn.training:
        raise ValueError(
            f"fuse_modules for quantization-aware training builds torch's ConvBn/LinearBn modules, which need "
            f"torch's BatchNorm; got {type(bn).__name__}. Convert first with batchnorm.convert(model, "
            "to=torch.nn.BatchNorm2d) (or 1d/3d), or fuse an eval-mode model."
        )
    check_foldable(layer, bn, "fuse_modules", keeps_activation=True)
    fuse = _saved["fuse_linear_bn_eval"] if isinstance(layer, nn.Linear) else _saved["fuse_conv_bn_eval"]
    fused = fuse(layer, bn)  # type: ignore[operator]
    from ..activations import to_module

    tail = [m for m in (to_module(bn.activation, bn.negative_slope), relu) if m is not None]
    if not tail:
        return fused
    if len(tail) == 1 and type(tail[0]) is nn.ReLU:  # torch's own (conv, bn, relu) result: quantizable as one op
        import torch.ao.nn.intrinsic as nni

        pair = {nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d, nn.Linear: nni.LinearReLU}
        if type(fused) in pair:
            return pair[type(fused)](fused, tail[0])
    return nn.Sequential(fused, *tail)


def install() -> None:
    """Wrap torch's entry points (idempotent); see the module docstring."""
    if _saved:
        return
    import torch.nn.utils as nn_utils
    import torch.nn.utils.fusion as fusion
    from torch.ao.quantization import fuser_method_mappings as fmm

    _saved["convert_sync_batchnorm"] = nn.SyncBatchNorm.__dict__["convert_sync_batchnorm"]
    _saved["fuse_conv_bn_eval"] = fusion.fuse_conv_bn_eval
    _saved["fuse_linear_bn_eval"] = fusion.fuse_linear_bn_eval
    original_sync = _saved["convert_sync_batchnorm"].__func__  # type: ignore[attr-defined]

    @functools.wraps(original_sync)
    def convert_sync_batchnorm(cls, module, process_group=None):
        if isinstance(module, BatchNorm):
            return convert_to_sync(module, process_group)
        return original_sync(cls, module, process_group)  # recurses through cls.convert_sync_batchnorm (this)

    nn.SyncBatchNorm.convert_sync_batchnorm = classmethod(convert_sync_batchnorm)  # type: ignore[assignment]
    nn.SyncBatchNorm.forward = _sync_forward  # type: ignore[method-assign]

    def guarded(original, kind):
        @functools.wraps(original)
        def fuse(layer, bn, *args, **kwargs):
            if isinstance(bn, BatchNorm):
                check_foldable(layer, bn, f"torch.nn.utils.{kind}")
            return original(layer, bn, *args, **kwargs)

        return fuse

    for kind in ("fuse_conv_bn_eval", "fuse_linear_bn_eval"):
        wrapped = guarded(_saved[kind], kind)
        setattr(fusion, kind, wrapped)
        setattr(nn_utils, kind, wrapped)

    table = fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    added = []
    for ours in _OURS:
        for conv in _CONVS:
            added += [(conv, ours), (conv, ours, nn.ReLU)]
        added.append((nn.Linear, ours))
    for key in added:
        table.setdefault(key, fuser_method)
    _saved["fuser_keys"] = added


def uninstall() -> None:
    """Put torch's originals back (for tests and for users who want torch's behaviour)."""
    if not _saved:
        return
    import torch.nn.utils as nn_utils
    import torch.nn.utils.fusion as fusion
    from torch.ao.quantization import fuser_method_mappings as fmm

    nn.SyncBatchNorm.convert_sync_batchnorm = _saved["convert_sync_batchnorm"]  # type: ignore[assignment]
    nn.SyncBatchNorm.forward = _TORCH_SYNC_FORWARD  # type: ignore[method-assign]
    for kind in ("fuse_conv_bn_eval", "fuse_linear_bn_eval"):
        setattr(fusion, kind, _saved[kind])
        setattr(nn_utils, kind, _saved[kind])
    for key in _saved["fuser_keys"]:  # type: ignore[union-attr]
        if fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD.get(key) is fuser_method:
            del fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD[key]
    _saved.clear()



# -- BN layers that apply child modules after the normalization (timm's BatchNormAct2d layout) --------------------

_WITH_MODULES: dict[type, type] = {}


class _ModulesAfter:
    """Mixin: the layer's own normalization, then its ``drop`` and ``act`` child modules: ``act(drop(bn(x)))``.

    The layout (child names, state-dict keys ``act.*``/``drop.*``) is timm's ``BatchNormAct2d``, so a converted
    timm model keeps its checkpoint keys. Under ``torch.fx`` the whole layer is one leaf call.
    """

    _base: type

    def forward(self, x, mask=None):
        if isinstance(x, fx.Proxy):
            return _export.fx_leaf(self, x, mask)
        y = super().forward(x) if mask is None else super().forward(x, mask)
        return self.act(self.drop(y))

    def __reduce_ex__(self, protocol):
        return (_rebuild, (self._base,), self.__dict__.copy())


def _rebuild(base: type):
    return object.__new__(with_modules(base))


def with_modules(base: type) -> type:
    """The class ``base`` (one of our layers) followed by its ``drop`` and ``act`` child modules.

    ``with_modules(BatchNorm)`` computes ``act(drop(BatchNorm(x)))``; build it as ``base`` is built, then assign
    ``layer.act`` and ``layer.drop`` (``nn.Identity`` by default). :func:`batchnorm.convert` uses it for timm's
    ``BatchNormAct2d`` when the activation has no fused form (e.g. ``nn.Hardswish``) or a drop layer is set.
    One class per ``base`` (cached); copies and pickles rebuild it from ``base``.

    Shape: as ``base``. Example::

        >>> from batchnorm import BatchNorm
        >>> layer = with_modules(BatchNorm)(8)
        >>> layer.act = nn.Hardswish()
        >>> type(layer).__name__, tuple(layer(torch.randn(4, 8)).shape)
        ('BatchNormAct', (4, 8))
    """
    cls = _WITH_MODULES.get(base)
    if cls is None:
        cls = type(f"{base.__name__}Act", (_ModulesAfter, base), {
            "__module__": __name__, "_base": base,
            "__doc__": f"{base.__name__} followed by its own ``drop`` and ``act`` modules (see with_modules)."})
        _WITH_MODULES[base] = cls

        def __init__(self, *args, **kwargs):
            base.__init__(self, *args, **kwargs)
            self.drop = nn.Identity()
            self.act = nn.Identity()

        __init__.__signature__ = inspect.signature(base.__init__)  # what convert and users read: base's arguments
        cls.__init__ = __init__
    return cls
