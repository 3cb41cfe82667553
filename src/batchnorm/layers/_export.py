"""What our layers look like to tracers and exporters (issue 12, item 3; decisions in docs/ecosystem.md).

Our kernels are numba functions behind ``torch.library`` custom ops: ``torch.compile`` and
``torch.export`` see them as opaque ops, but ``torch.fx.symbolic_trace`` (Proxy inputs), ``torch.jit``
and the ONNX exporters cannot run or translate them. So, only while tracing:

* ``torch.fx`` symbolic tracing — the layer records itself as a **leaf** ``call_module`` node, like
  ``torch.nn.BatchNorm2d`` (the graph runs the real layer, all semantics kept; input checks never
  touch the Proxy);
* ``torch.jit.trace`` (and the legacy ``torch.onnx.export``, which traces) — the layer **lowers** to
  ATen's ``batch_norm`` (what ``torch.nn.BatchNorm*d`` records) plus the fused activation as a second
  op, with ``movedim`` around it when the feature axis is not 1; cases ATen's batch norm cannot express
  (masked or ghost batches, renormalization in training) raise one error that names the alternatives;
* ``torch.export`` (and ``torch.onnx.export(..., dynamo=True)``) — every layer ATen's batch norm expresses
  lowers the same way, in eval and in training (the exported training graph is torch's BN graph node for node,
  so PT2E QAT and other passes written for torch's BN apply); the rest (masks, ghost batches, renorm in
  training) export as the composite torch ops (:func:`batchnorm.functional.normalize`). Either way the graph
  does not depend on the numba warm-up, autograd differentiates it, and ``torch.export.save``/``load`` round-trip.

* ``torch.compile`` — plain layers (no mask, ghost batches or renorm; ``memory="default"``; backend
  not forced; ``momentum`` not None) lower the same way, with the non-finite guard done in-graph:
  inductor then compiles them as fast as torch's own BN (``BATCHNORM_COMPILE=kernels`` keeps our ops).

``torch.jit.script`` is refused with one clear error (see :meth:`BatchNorm.__prepare_scriptable__`).

The lowered training path follows ``torch.nn.BatchNorm*d`` exactly (including its momentum=None
cumulative average); what it does not have is our guard that skips the running update on a batch
with non-finite statistics — a traced training graph behaves as torch's BN there.
"""

from __future__ import annotations

import os

import torch
from torch import fx

from .. import _checks
from .. import activations as _acts
from .. import functional as bnf

_SCRIPT_ALTERNATIVES = (
    "Instead use torch.jit.trace(model.eval(), example_input) (our layers record ATen's batch_norm when traced), "
    "torch.export.export / torch.onnx.export, or torch.compile; or script a copy with torch's layers: "
    "batchnorm.convert(model, to=torch.nn.BatchNorm2d)."
)


_Proxy = fx.Proxy
_jit_tracing = torch.jit.is_tracing  # (not torch._C._is_tracing: dynamo would try to put that in its graph)
_exporting = torch.compiler.is_exporting


_compiling = torch.compiler.is_compiling


def active(x: object) -> bool:
    """True while ``x`` flows through a tracer, exporter or compiler that this module handles (< 1 µs eager)."""
    return isinstance(x, _Proxy) or _jit_tracing() or _compiling() or _exporting()


def tracing(x: object) -> bool:
    """:func:`active` without plain ``torch.compile`` (fx, jit.trace, export): input checks must be skipped."""
    return isinstance(x, _Proxy) or _jit_tracing() or _exporting()


def _compile_lowers(layer) -> bool:
    """Under torch.compile, plain layers on the automatic backend lower to ATen (``BATCHNORM_COMPILE=kernels``: never).

    Why: inductor compiles ATen's batch norm as fast as for torch's own BN, while tracing our kernel glue and
    custom ops costs extra compile time (issue 12 item 6; docs/ecosystem.md). A forced backend is respected.
    """
    if os.environ.get("BATCHNORM_COMPILE", "") == "kernels" or getattr(layer, "memory", "default") != "default":
        return False
    return getattr(layer, "backend", None) in (None, "auto") and os.environ.get("BATCHNORM_BACKEND", "") in ("", "auto")


def forward(layer, x, mask):
    """The traced/exported/compiled forward of a BatchNorm-family ``layer``, or None for "run the eager path"."""
    if isinstance(x, fx.Proxy):
        return fx_leaf(layer, x, mask)
    uses_batch = layer.training or layer.running_mean is None or layer.running_var is None
    jit = torch.jit.is_tracing()
    why = _not_lowerable(layer, x, mask, uses_batch)
    if not jit and not _exporting():  # torch.compile
        if why or not _compile_lowers(layer) or (layer.training and layer.momentum is None):
            return None  # our custom ops (cumulative momentum would need a host read of num_batches_tracked)
        return lowered(layer, x, uses_batch, guard=True)
    if not jit:  # torch.export: ATen's batch_norm wherever it expresses the layer (one graph, warm numba or cold)
        if why:
            return None  # the composite torch ops (functional.normalize routes exporting calls there)
        # no in-graph guard: the exported training graph is torch.nn.BatchNorm*d's, node for node, which is what
        # graph passes written for torch's BN match (PT2E QAT's conv-BN fusion expects the buffers as get_attr)
        return lowered(layer, x, uses_batch)
    if why:
        raise RuntimeError(
            f"torch.jit.trace cannot record {type(layer).__name__} {why}: ATen's batch_norm, which the trace records, "
            "has no such option. Trace the model in eval mode (model.eval()), or use torch.export.export or "
            "torch.compile, which keep this layer's own ops."
        )
    return lowered(layer, x, uses_batch)


def fx_leaf(layer, x: fx.Proxy, mask):
    """Record ``layer(x, mask=mask)`` as one ``call_module`` node of ``x``'s tracer."""
    tracer = x.tracer
    try:
        path = tracer.path_of_module(layer)
    except NameError as err:
        raise RuntimeError(
            f"torch.fx cannot trace a {type(layer).__name__} that is not a submodule of the traced module "
            f"({err}). Make the layer an attribute of the module you trace (e.g. self.bn = ...)."
        ) from None
    kwargs = {} if mask is None else {"mask": mask}
    return tracer.create_proxy("call_module", path, (x,), kwargs)


def _not_lowerable(layer, x, mask, uses_batch: bool) -> str | None:
    if not uses_batch:
        return None  # eval with running estimates: every variant is y = act(x·a + b); a mask changes nothing
    if mask is not None:
        return "with a mask and batch statistics"
    if layer.training and layer._group_size(x) is not None:
        return "in training (ghost batches)"
    if type(layer._combine()) is not bnf.Combine:
        return f"in training ({type(layer._combine()).__name__} statistics)"
    return None


def lowered(layer, x: torch.Tensor, uses_batch: bool, guard: bool = False) -> torch.Tensor:
    """``act(batch_norm(x))`` with ATen's batch norm on a view whose feature axis is 1 (torch's rules).

    ``guard``: a training update whose new running estimates are not finite is undone in-graph (no host
    read, so no warning): the README's "a non-finite batch never updates the running estimates".
    """
    name = type(layer).__name__
    if x.dim() < 2:
        _checks.check_input(x, name)  # the usual error for a 0-D/1-D input
    axis = _checks.normalize_axis(layer.axis, x.dim(), tuple(x.shape))
    _checks.check_features(x, axis, layer.num_features, name)
    rm, rv = layer.running_mean, layer.running_var
    update = uses_batch and layer.training and layer.track_running_stats and rm is not None
    update = update and layer.num_batches_tracked is not None
    factor = 0.0
    guard = guard and update
    if guard:  # ATen updates copies (its backward saves them); the buffers take them only if finite
        buffers, rm, rv = (rm, rv), rm.clone(), rv.clone()
        factor = float(layer.momentum)
    elif update:  # as torch.nn.BatchNorm*d.forward
        layer.num_batches_tracked.add_(1)
        factor = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else float(layer.momentum)
    keep = not uses_batch or update  # batch statistics without updates: ATen gets no running buffers
    xt = x if axis == 1 else x.movedim(axis, 1)
    low = xt.dtype in (torch.float16, torch.bfloat16)
    y = torch.nn.functional.batch_norm(
        xt.float() if low else xt, rm if keep else None, rv if keep else None, layer.weight, layer.bias,
        uses_batch, factor, layer.eps,
    )
    if guard:
        ok = torch.isfinite(rm).all() & torch.isfinite(rv).all()
        buffers[0].copy_(torch.where(ok, rm, buffers[0]))
        buffers[1].copy_(torch.where(ok, rv, buffers[1]))
        layer.num_batches_tracked.add_(ok.to(layer.num_batches_tracked.dtype))
    if low:
        y = y.to(xt.dtype)
    if axis != 1:
        y = y.movedim(1, axis)
    act = getattr(layer, "activation", None)
    if act not in (None, "identity"):
        y = _acts.get(act).forward(y, float(getattr(layer, "negative_slope", 0.01)))
    return y


def script_error(layer) -> RuntimeError:
    """The one error ``torch.jit.script`` gets for our layers."""
    return RuntimeError(
        f"torch.jit.script cannot compile {type(layer).__name__}: its kernels are numba functions behind "
        f"torch.library ops, which TorchScript cannot compile. {_SCRIPT_ALTERNATIVES}"
    )
