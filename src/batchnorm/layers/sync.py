"""SyncBatchNorm: batch statistics of the union of the batches of every process in a group.

Only the *combine* step changes (see :mod:`batchnorm.functional`): the local per-feature
``(count, mean, m2)`` of every process are gathered with one ``torch.distributed`` collective and
merged exactly (Chan et al.), and in the backward the two per-feature sums ``(Σ dy, Σ dy·x̂)`` are
gathered and summed. Reduce and apply are the same kernels as :class:`~batchnorm.BatchNorm`.

Every gathered message carries a small header (direction, layer number, step of the layer, feature
count, dtype), so ranks that fall out of step are caught inside the collective they already make.
On the CPU the header is checked by the host at once; on a GPU it is checked on the device and
reported at the layer's next call (see :class:`SyncBatchNorm`, "Agreement checks").
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist

from .. import _checks
from .. import functional as bnf
from ..kernels import dispatch
from ..kernels.backend import SavedState
from .base import BatchNorm


def _group_world(process_group) -> int:
    """World size of ``process_group`` (default group if None), or 1 outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _collective_failed(what: str, world: int, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"SyncBatchNorm: the {what} across the {world} processes of the process group failed "
        f"({type(err).__name__}: {err}). Another process probably died, raised an error, or did not reach this "
        "layer within the process group's timeout (set it with torch.distributed.init_process_group(timeout=...)). "
        "Every process must run the same SyncBatchNorm layers in the same order, also with an empty batch; "
        "if that cannot be guaranteed, use a per-process BatchNorm instead."
    )


class ProcessGroupMismatchError(RuntimeError, ValueError):
    """The processes of a group called a :class:`SyncBatchNorm` inconsistently.

    Either with different feature counts or dtypes, or out of step (different layers or different
    steps of one layer met in one collective). Raised on every rank (each sees all ranks' headers);
    a size disagreement is caught before any collective whose size depends on it, so no rank aborts
    inside the communication backend. A ``RuntimeError`` as torch's collective errors, and a
    ``ValueError`` as the other input errors of this package.
    """


# input dtypes by code for the rank agreement check (0: any other dtype)
_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)

# what a gathered message carries after its data: (direction, layer, step, features, dtype, positions)
_KINDS = {0: "first-call check", 1: "forward statistics", 2: "backward sums"}
_FORWARD, _BACKWARD = 1, 2
_HEADER = 6
_COMPARED = 5  # every rank must send the same first five fields; positions (its batch size) may differ

_layer_numbers = itertools.count(1)  # layers are numbered in the order this process first synchronizes them


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else 0


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).replace("torch.", "") if 0 < code < len(_DTYPES) else "another dtype"


def _mismatch(name: str, world: int, table: list[tuple[int, int]]) -> ProcessGroupMismatchError:
    """Error naming every rank's (features, input dtype); ``table[r]`` is rank r's pair."""
    ranks = "; ".join(f"rank {r}: {c} features, {_dtype_name(d)}" for r, (c, d) in enumerate(table))
    what = []
    if len({c for c, _ in table}) > 1:
        what.append("feature counts")
    if len({d for _, d in table}) > 1:
        what.append("input dtypes")
    return ProcessGroupMismatchError(
        f"{name}: the {world} processes of the process group disagree on the {' and '.join(what)} of this layer "
        f"({ranks}). Every process must build the same model (same num_features for each SyncBatchNorm) and feed "
        "inputs of the same dtype (cast with x.to(dtype), or use the same autocast settings on every rank); "
        "no collective was run with mismatched sizes."
    )


def _out_of_step(world: int, num_features: int, rows: list[tuple[int, int, int]], late: bool) -> ProcessGroupMismatchError:
    """Error naming, per rank, the (direction, layer number, step) that met in one collective."""
    ranks = "; ".join(
        f"rank {r}: layer #{layer}, step {call + 1} ({_KINDS.get(kind, 'unknown')})"
        for r, (kind, layer, call) in enumerate(rows)
    )
    after = (
        "That step's statistics were set to NaN on the device (so the running estimates refused it) and the error "
        "is raised at this layer's next call. " if late else "Nothing was merged. "
    )
    return ProcessGroupMismatchError(
        f"SyncBatchNorm (num_features={num_features}): the {world} processes of the process group are out of step: "
        f"one collective paired {ranks}. Merging them would mix statistics of different steps or layers. {after}"
        "Every process must call each SyncBatchNorm layer the same number of times, in the same order and mode: "
        "a training step with the layer in eval mode on some ranks only, or an extra training-mode forward on "
        "one rank, puts them out of step (evaluation in eval mode under torch.no_grad() is not counted and may "
        "differ between ranks). Layers are numbered in the order this process first synchronized them; steps "
        "count this layer's training-mode calls and its eval-mode calls with gradients enabled, from 1."
    )


def _too_few(n: int, world: int, shape: tuple[int, ...], masked: bool, name: str) -> ValueError:
    err = _checks.too_few_values(n, shape, masked, name)
    return ValueError(
        f"{err} (The count is global: summed over the {world} processes of the process group; "
        f"this process's input has shape {shape}.)"
    )


def _wire_dtype(device: torch.device) -> torch.dtype:
    """float64 on the wire (exact counts, exact merge of float64 statistics); float32 where float64 is missing."""
    return torch.float32 if device.type == "mps" else torch.float64


def _gather(flat: torch.Tensor, world: int, group) -> torch.Tensor:
    """One all-gather of ``flat`` (same size on every rank) into a ``(world, len)`` tensor on flat's device."""
    out = flat.new_empty(world * flat.numel())
    single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    single(out, flat, group=group)
    return out.view(world, -1)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _SyncState:
    """A layer's collective bookkeeping: its number, its step counter, and a device-side fault not yet reported.

    Not part of the state dict. Copies (``copy.deepcopy``, pickling) keep the number and the step
    counter and drop the device record and the caches.
    """

    def __init__(self) -> None:
        self.number: int | None = None  # assigned at the first collective (order of first synchronization)
        self.calls = 0
        self._transient()

    def _transient(self) -> None:
        self.agreed: set = set()  # (process group, world) whose ranks agreed on the feature count and dtype
        self.pending: torch.Tensor | None = None  # device record [code, n, header table] of the last gather
        self.host: torch.Tensor | None = None  # its host copy (pinned on CUDA)
        self.event: Any = None  # CUDA event recorded after the copy; None: the copy is already complete
        self.context: tuple = ()  # (world, num_features, shape, masked, name) for the error message
        self.consts: dict = {}  # cached header constants per (device, direction, features, dtype)

    def __getstate__(self) -> dict:
        return {"number": self.number, "calls": self.calls}

    def __setstate__(self, state: dict) -> None:
        self.number, self.calls = state["number"], state["calls"]
        self._transient()

    def header(self, device: torch.device, dtype: torch.dtype, kind: int, features: int, dtype_code: int,
               call: int, positions: int, prefix: int = 0) -> torch.Tensor:
        """``[0]*prefix + (kind, number, call, features, dtype_code, positions)`` on ``device`` without a host copy.

        The constant part is copied to the device once per key; the step and the positions (the batch size
        may change from step to step) enter as scalar arguments of ``add`` kernels, so no step copies host
        data to the device.
        """
        key = (device, dtype, kind, features, dtype_code, prefix)
        hit = self.consts.get(key)
        if hit is None:
            base = torch.zeros(prefix + _HEADER, dtype=dtype)
            base[prefix:prefix + _COMPARED] = torch.tensor([kind, self.number, 0, features, dtype_code], dtype=dtype)
            unit = torch.zeros(2, prefix + _HEADER, dtype=dtype)
            unit[0, prefix + 2] = unit[1, prefix + 5] = 1
            hit = self.consts[key] = (base.to(device), unit.to(device))
        base, unit = hit
        out = torch.add(base, unit[0], alpha=call)
        return out.add_(unit[1], alpha=positions) if positions else out

    def record(self, code: torch.Tensor, n: torch.Tensor, table: torch.Tensor) -> None:
        """Keep the first fault not yet reported (on the device) and start its copy to the host, non-blocking."""
        rec = torch.cat([code.reshape(1), n.reshape(1), table.reshape(-1)])  # cat promotes to table's dtype
        if self.pending is not None and self.pending.shape == rec.shape:
            rec = torch.where(self.pending[0] != 0, self.pending, rec)  # sticky: the first fault is the one reported
        self.publish(rec)

    def buffer(self, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
        """Where a kernel writes the next record itself (the triton route): ``(buffer, sticky)``. The pending record
        when it has that layout (``sticky``: the kernel keeps a fault already in it, the rule of :meth:`record`),
        else a new buffer."""
        rec = self.pending
        if rec is not None and rec.shape == (size,) and rec.dtype == dtype and rec.device == device:
            return rec, True
        return torch.empty(size, dtype=dtype, device=device), False

    def publish(self, rec: torch.Tensor) -> None:
        """Make ``rec`` (``[code, n, header table]`` on the device) the pending record and start its host copy."""
        self.pending = rec
        if rec.device.type == "cpu":  # CPU tensors taking the GPU route (tests): the record is host memory
            self.host, self.event = rec, None
        elif rec.is_cuda:
            if _capturing():  # inside a CUDA graph: the device record only (read it with SyncBatchNorm.check())
                self.host = self.event = None
                return
            if self.host is None or self.host.shape != rec.shape:
                self.host = torch.empty(rec.shape, dtype=rec.dtype, pin_memory=True)
            self.host.copy_(rec, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:  # other devices: read at the next call with a blocking copy
            self.host = self.event = None

    def poll(self, wait: bool = False) -> None:
        """Raise the fault recorded at an earlier call, if its host copy has arrived (or ``wait``: wait for it)."""
        rec = self.pending
        if rec is None:
            return
        if self.event is not None:
            if _capturing():
                return
            if wait:
                self.event.synchronize()
            elif not self.event.query():
                return  # not arrived yet: a later call reports it (the record is sticky)
            values = self.host.numpy()
        elif self.host is not None:
            values = self.host.numpy()
        elif wait or rec.device.type not in ("cuda", "cpu"):
            values = rec.detach().to("cpu").numpy()  # a blocking copy (non-CUDA devices, or check())
        else:
            return
        code = int(values[0])
        if code == 0:
            self.pending = None  # read and clean: the next record starts afresh (no sticky select)
            return
        self.pending = self.host = self.event = None  # reported once
        world, num_features, shape, masked, name = self.context
        table = values[2:].reshape(world, _HEADER)
        if code == 1:
            raise _rank_error(world, num_features, table, name, late=True)
        raise _too_few(int(values[1]), world, shape, masked, name)


def _rank_error(world: int, num_features: int, table, name: str, late: bool) -> ProcessGroupMismatchError:
    """The error for a header table ``(world, 6)`` whose compared fields disagree."""
    rows = [tuple(int(v) for v in row) for row in table]
    sizes = [(features, dtype) for _, _, _, features, dtype, _ in rows]
    if len(set(sizes)) > 1:
        return _mismatch(name, world, sizes)
    return _out_of_step(world, num_features, [(kind, layer, call) for kind, layer, call, *_ in rows], late)


class SyncCombine(bnf.Combine):
    """*Combine* across processes: exact merge of ``(count, mean, m2)`` and a sum of the backward sums.

    Before the first gather of a layer, one fixed-size ``all_gather`` of ``(features, dtype, groups,
    layer, step)`` checks that every rank agrees (a mismatch would make gloo abort the process on the
    size-dependent gather); the host reads it, once per layer and process group.

    Forward: one ``all_gather`` of ``[mean, m2, count, header]`` per process (float64), then
    ``n = Σ_r n_r``, ``μ = Σ_r n_r μ_r / n``, ``M2 = Σ_r M2_r + Σ_r n_r (μ_r − μ)²`` — every term is
    centred, so there is no ``E[x²] − E[x]²`` cancellation, and a process with an empty batch
    (``n_r = 0``) contributes nothing but still takes part in the collective. Backward: one
    ``all_gather`` of ``[Σ dy, Σ dy·x̂, 0, header]`` — the same size as the forward message, so a
    forward paired with a backward is caught by the header instead of aborting in the backend — then
    a sum over ranks. Both happen inside the autograd function on detached tensors, so autograd
    never differentiates through a collective. The header is
    ``(direction, layer number, step, features, dtype, positions)``; the first five must agree.

    Shape: every statistic is ``(G, C)`` (G = 1 unless ghost groups are used; groups with the same
    index are merged across processes).
    """

    def __init__(
        self,
        process_group,
        world: int,
        positions: int,
        shape: tuple[int, ...],
        masked: bool,
        name: str,
        dtype: torch.dtype | None = None,
        state: _SyncState | None = None,
        call: int = 0,
        num_features: int = 0,
    ):
        self.process_group = process_group
        self.world = world
        self.positions = positions
        self.shape = shape
        self.masked = masked
        self.name = name
        self.dtype_code = _dtype_code(dtype) if dtype is not None else 0
        self.state = state if state is not None else _SyncState()
        self.call = call
        self.num_features = num_features

    def _agree(self, features: int, groups: int, device: torch.device) -> None:
        """Once per layer and process group: a fixed-size all_gather of (features, dtype, groups, layer, step).

        Every later gather is ``2·G·C + G + 6`` values, so it only runs once the ranks are known to agree on
        ``G·C``; its header carries the dtype, the layer number and the step, checked on every call.
        """
        st = self.state
        key = (id(self.process_group), self.world)
        if key in st.agreed:
            return
        meta = torch.tensor([features, self.dtype_code, groups, st.number, self.call], dtype=torch.int64,
                            device=device)
        table = meta.new_empty(self.world * meta.numel())
        try:
            single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            single(table, meta, group=self.process_group)
        except Exception as err:
            raise _collective_failed("check that all processes agree on the feature count", self.world, err) from err
        rows = [tuple(row) for row in table.view(self.world, -1).tolist()]  # a host read: first call only
        if len({r[:3] for r in rows}) > 1:
            raise _mismatch(self.name, self.world, [(c * g, d) for c, d, g, _, _ in rows])
        if len({r[3:] for r in rows}) > 1:
            raise _out_of_step(self.world, self.num_features, [(0, layer, call) for *_, layer, call in rows], False)
        st.agreed.add(key)

    def _start(self, like: torch.Tensor) -> tuple[bool, torch.dtype]:
        """Report an earlier fault, number the layer; ``(host checks, wire dtype)`` for tensors like ``like``.

        The host checks the header at once only on the CPU (:func:`~batchnorm.kernels.dispatch.device_type`,
        the one device check, so tests can send CPU tensors down the GPU route).
        """
        st = self.state
        st.poll()
        if st.number is None:
            st.number = next(_layer_numbers)
        st.context = (self.world, self.num_features, self.shape, self.masked, self.name)
        return dispatch.device_type(like) == "cpu", _wire_dtype(like.device)

    def _fault(self, host: bool, table: torch.Tensor, n_min: torch.Tensor | None, few: torch.Tensor | None):
        """Check a gathered header table: raise at once (host), or fold it into a NaN term and a record (device).

        ``few`` (with ``n_min``, the smallest global count): the "more than 1 value" check, or None where it
        cannot fail. Returns None (host) or the 0-d term to add to the statistics: NaN where faulty, else 0.
        """
        bad = (table[:, :_COMPARED] != table[:1, :_COMPARED]).any()
        if host:
            if bool(bad):
                raise _rank_error(self.world, self.num_features, table.tolist(), self.name, late=False)
            if few is not None and bool(few):
                raise _too_few(int(n_min), self.world, self.shape, self.masked, self.name)
            return None
        if few is None:
            self.state.record(bad, bad, table)  # the record's cat promotes the flag
            return torch.where(bad, float("nan"), 0.0)
        code = torch.where(bad, 1.0, torch.where(few, 2.0, 0.0))
        self.state.record(code, n_min, table)
        return torch.where(bad | few, float("nan"), 0.0)

    def _gathered(self, flat: torch.Tensor, what: str) -> torch.Tensor:
        """The all-gather of one message (``what`` names it in the error of a failed collective)."""
        try:
            return _gather(flat, self.world, self.process_group)
        except Exception as err:  # gloo raises RuntimeError/DistBackendError; say what it means here
            raise _collective_failed(f"all_gather of {what}", self.world, err) from err

    def _gather_stats(self, flat: torch.Tensor) -> torch.Tensor:
        return self._gathered(flat, "batch statistics")

    def _gather_grads(self, flat: torch.Tensor) -> torch.Tensor:
        return self._gathered(flat, "gradient sums")

    def _record_buffer(self, host: bool, wire: torch.dtype, device: torch.device) -> tuple[torch.Tensor, bool]:
        """Where the kernels write this step's fault record: ``(buffer, sticky)`` (:meth:`_SyncState.buffer`; a new
        one where the host checks at once)."""
        size = 2 + _HEADER * self.world
        if host:
            return torch.empty(size, dtype=wire, device=device), False
        return self.state.buffer(size, wire, device)

    def _settle(self, host: bool, rec: torch.Tensor) -> None:
        """After a kernel wrote the record ``rec``: raise at once (host checks), or make it the pending record."""
        if not host:
            self.state.publish(rec)
            return
        values = rec.tolist()  # host memory: the CPU route reads it for free
        code = int(values[0])
        if code == 1:
            rows = [values[2 + _HEADER * r:2 + _HEADER * (r + 1)] for r in range(self.world)]
            raise _rank_error(self.world, self.num_features, rows, self.name, late=False)
        if code == 2:
            raise _too_few(int(values[1]), self.world, self.shape, self.masked, self.name)

    def fused_forward(self, ops, x, s, m, weight, bias, running):
        """The training forward on a backend with fused sync sequences (triton's ``sync_forward``): the same message,
        header, merge and checks as :meth:`stats` with the combine in its kernels. ``(y, stats, invstd, finite,
        backward message)``."""
        host, wire = self._start(x)
        features = x.shape[s.axis]
        self._agree(int(features), 1, x.device)
        rec, sticky = self._record_buffer(host, wire, x.device)
        header = (self.state.number, self.call, self.dtype_code, self.positions)
        out = ops.sync_forward(x, s, m, weight, bias, running, header, self._gather_stats, rec, sticky,
                               self.masked or self.positions <= 1)
        self._settle(host, rec)
        return out

    def fused_backward(self, ops, dy, t, s, stats, invstd, weight, bias, count, m, needs, back):
        """The backward of :meth:`fused_forward` (triton's ``sync_backward``): the gather of :meth:`grads` (only where
        the input gradient is wanted, as in the composed steps). ``(dx, dγ, dβ)``."""
        if not needs[0]:
            return ops.sync_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs, back, None, None, False)
        host, wire = self._start(dy)
        rec, sticky = self._record_buffer(host, wire, dy.device)
        out = ops.sync_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs, back, self._gather_grads,
                                rec, sticky)
        self._settle(host, rec)
        return out

    def stats(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
        dtype = mean.dtype
        groups, features = count.shape[-2:] if count.dim() >= 2 else (1, count.shape[-1])
        host, wire = self._start(mean)
        self._agree(int(features), int(groups), mean.device)
        gc = groups * features
        header = self.state.header(mean.device, wire, _FORWARD, gc, self.dtype_code, self.call, self.positions)
        counts = count.reshape(groups, -1)[:, :1]
        # one kernel: cat promotes every part to the wire dtype of the header
        flat = torch.cat([mean.reshape(-1), m2.reshape(-1), counts.reshape(-1), header])
        table = self._gather_stats(flat)
        means = table[:, :gc].view(self.world, groups, features)
        m2s = table[:, gc:2 * gc].view(self.world, groups, features)
        ns = table[:, 2 * gc:2 * gc + groups].view(self.world, groups, 1)
        head = table[:, 2 * gc + groups:]
        n = ns.sum(0)
        few = n_min = None
        if self.masked or self.positions <= 1:  # else this rank alone counts ≥ 2 values: the global count is ≥ 2
            n_min = n.min()
            few = (n_min <= 1) & ~((n_min == 0) & (head[:, 5].max() == 0))  # an all-empty group is allowed
        poison = self._fault(host, head, n_min, few)
        den = n.clamp_min(1) if poison is None else n.clamp_min(1) + poison  # NaN reaches μ, and M2 through μ
        mu = (ns * means).sum(0) / den
        total_m2 = torch.addcmul(m2s, ns, (means - mu).square()).sum(0)
        return n.expand(groups, features).to(count.dtype), mu.to(dtype), total_m2.to(dtype)

    def grads(self, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor):
        dtype = sum_dy.dtype
        host, wire = self._start(sum_dy)
        gc = sum_dy.numel()
        groups = sum_dy.shape[0] if sum_dy.dim() >= 2 else 1
        tail = self.state.header(sum_dy.device, wire, _BACKWARD, gc, self.dtype_code, self.call, 0, prefix=groups)
        flat = torch.cat([sum_dy.reshape(-1), sum_dy_xhat.reshape(-1), tail])
        table = self._gather_grads(flat)
        both = table[:, :2 * gc].sum(0)
        poison = self._fault(host, table[:, 2 * gc + groups:], None, None)
        if poison is not None:
            both = both + poison
        both = both.to(dtype)
        return both[:gc].view_as(sum_dy), both[gc:].view_as(sum_dy_xhat)


class _FusedSync(torch.autograd.Function):
    """SyncBatchNorm's training step on a backend with fused sync sequences (triton's ``sync_forward`` /
    ``sync_backward``: 4 launches each way around the two collectives, the running update in the forward's merge).

    The same messages, merge and checks as :class:`SyncCombine` composed by ``functional._TrainNorm``; the backward
    message is prepared by the forward (its header is the forward's step), the collectives run on detached tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m, s, ops, comb, running, stash):
        y, stats, invstd, finite, back = comb.fused_forward(ops, x, s, m, weight, bias, running)
        stash.append(finite)
        if s.save:  # memory="save": the output, the global count (one column), not the input
            ctx.save_for_backward(y, m, invstd, weight, bias, stats[0][:, :1], back)
        else:
            ctx.save_for_backward(x, m, invstd, weight, bias, stats, back)
        ctx.state = SavedState(s, ops, comb, False, True)
        return y

    @staticmethod
    def backward(ctx, dy):
        st = ctx.state
        s = st.settings
        t, m, invstd, weight, bias, saved, back = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: refused with the composed route's errors
            return bnf._double_backward(ctx, dy, t, weight, bias, m, None, None)
        count, stats = (saved, None) if s.save else (None, saved)
        grads = st.combine.fused_backward(st.backend, dy, t, s, stats, invstd, weight, bias, count, m,
                                          ctx.needs_input_grad[:3], back)
        return (*grads, None, None, None, None, None, None)


class SyncBatchNorm(BatchNorm):
    r"""Batch normalization whose training statistics are those of the union of all processes' batches.

    With processes ``r = 1..W`` of ``process_group`` holding batches ``B_r`` (any sizes, empty
    allowed), training normalizes every process's input with the statistics of ``∪_r B_r``::

        μ = Σ_r Σ_{i∈B_r} x_ic / n          σ² = Σ_r Σ_{i∈B_r} (x_ic − μ)² / n          n = Σ_r |B_r|

    and updates the running estimates with them (unbiased ``σ² · n/(n − 1)``), so every process ends
    with the same running statistics. The backward sums ``(Σ dy, Σ dy·x̂)`` over processes, so the input
    gradient on each process is the gradient of the *sum* of all processes' losses — exactly what a
    single process would compute on the concatenated batch. Parameter gradients stay local (DDP
    all-reduces them). The "more than 1 value per feature" check uses the global count ``n``.

    Collectives: one ``all_gather`` per training forward and one per backward (the per-feature
    statistics, resp. sums, and a 6-value header), on the statistics' device (so NCCL works), merged
    on the device; plus, at a layer's first call in a process group, one fixed-size gather that
    checks ``num_features`` and the dtype before any size-dependent collective. Where triton serves the
    step (the GPU route, or ``backend="triton"``), kernels pack, merge and check the same messages:
    4 launches forward and 4 backward around the two collectives, no other kernel (docs/gpu.md).

    Agreement checks. Each message's header holds the direction (forward/backward), the layer's number
    (the order in which this process first synchronized its layers), the layer's step (its
    training-mode calls plus its eval-mode calls with gradients enabled) and the feature count and
    dtype. Ranks whose headers differ raise :class:`ProcessGroupMismatchError` (a ``RuntimeError``
    and a ``ValueError``) on every rank, naming each rank's layer and step, or feature count and dtype:

    * on the CPU, at the collective itself (the host reads the gathered header; nothing is merged);
    * on a GPU, no host read happens on a step: the check runs on the device, a mismatch (or a
      global count ≤ 1) turns that step's statistics into NaN — so the output is NaN and the device
      guard refuses the running update — and its record is copied to pinned host memory without
      blocking; the layer raises at its next call once the copy has arrived (a CUDA event query, no
      wait). A rank whose copy has not arrived yet raises at a later call; meanwhile its collectives
      may find no partner and fail at the process group's timeout. Inside a captured CUDA graph only
      the device record is kept: call :meth:`check` (it waits for the device) to raise it.

    A rank that runs a training step with this layer in eval mode is counted (its step advances with
    no collective), so the other ranks' next gather finds different steps. Eval-mode calls under
    ``torch.no_grad()`` are not counted: ranks may evaluate different amounts of data. Mis-paired
    collectives of *different-sized* layers cannot be compared: gloo aborts such a gather ("Received
    data size doesn't match expected size") and NCCL waits until the process group's timeout.

    Evaluation mode, ``torch.distributed`` not initialized, or a group of one process: exactly
    :class:`BatchNorm` (no collective at all). As ``torch.nn.SyncBatchNorm``, every process of the
    group must call the layer the same number of times in the same order (also with an empty batch);
    a process that dies makes the others fail with a RuntimeError once the collective notices (at
    the latest after the process group's timeout). Runs on CPU with gloo (tested) and on CUDA with
    NCCL (the GPU route is tested on gloo with CPU tensors; see docs/gpu.md). Double backward through
    synchronized statistics is not supported.

    Args: as :class:`BatchNorm` (other keyword options, such as a fused activation, are passed on to
    it), plus ``process_group`` (None: the default group).

    Shape: as :class:`BatchNorm`: ``(N, C, *)`` or ``(N, *, C)`` with ``axis=-1``; ``N`` may differ
    between processes and may be 0.

    Example (in a script started with ``torchrun --nproc_per_node=2 train.py``, after
    ``torch.distributed.init_process_group("gloo")``, convert a model and wrap it:
    ``DistributedDataParallel(batchnorm.convert(model, to=batchnorm.SyncBatchNorm))``; see
    ``examples/ddp_train.py``). Outside torch.distributed it is BatchNorm::

        >>> layer = SyncBatchNorm(8)
        >>> x = torch.randn(4, 8, 10)
        >>> torch.equal(layer(x), BatchNorm(8)(x))
        True

    Reference: Ioffe & Szegedy (2015); synchronized BN as in Peng et al., "MegDet: A Large
    Mini-Batch Object Detector", CVPR 2018, and ``torch.nn.SyncBatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        axis: int = 1,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        bias: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, axis=axis, device=device, dtype=dtype,
            bias=bias, **options,
        )
        self.process_group = process_group
        self._local: tuple[int, tuple[int, ...], torch.dtype | None] = (0, (), None)
        self._sync = _SyncState()

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` spelling of ``batchnorm.convert(module, to=cls)``.

        Returns a new model (the original is untouched; torch's version converts in place).
        """
        from ..tools.convert import convert

        return convert(module, to=cls, process_group=process_group)

    def _state(self) -> _SyncState:
        st = self.__dict__.get("_sync")
        if st is None:  # a layer built without __init__ (e.g. an old pickle)
            st = self.__dict__["_sync"] = _SyncState()
        return st

    def check(self) -> None:
        """Raise now a mismatch recorded on the device and not reported yet (waits for the device: a host sync).

        Useful at the end of training, or after replaying a captured CUDA graph; a no-op on the CPU, where
        every mismatch is raised at the collective itself.
        """
        self._state().poll(wait=True)

    def _validated(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        x, axis = super()._validated(x)
        # remember positions per feature of this process's batch: the global empty-batch check needs it
        self._local = (x.numel() // max(x.shape[axis], 1), tuple(x.shape), x.dtype)
        return x, axis

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x`` with the statistics of all processes' batches (training) or the running ones."""
        self._masked = mask is not None
        if _group_world(self.process_group) > 1:
            st = self._state()
            st.poll()  # a fault the device recorded at an earlier call (GPU route)
            if self.training or torch.is_grad_enabled():
                # a step of this layer: the other ranks' steps must match it (eval under no_grad is free)
                self.__dict__["_sync_call"] = st.calls
                st.calls += 1
        return super().forward(x, mask)

    def _combine(self) -> bnf.Combine:
        world = _group_world(self.process_group)
        if world <= 1 or not self.training:
            return bnf.Combine()
        positions, shape, dtype = self._local
        return SyncCombine(
            self.process_group, world, positions, shape, getattr(self, "_masked", False), "SyncBatchNorm",
            dtype, self._state(), self.__dict__.get("_sync_call", 0), self.num_features,
        )

    def _group_size(self, x: torch.Tensor) -> int | None:
        return None

    def _fused_training(self, x: torch.Tensor, mask, axis: int, s) -> torch.Tensor | None:
        """A training step with running estimates across processes on a backend with fused sync sequences (triton:
        the GPU route, or ``backend="triton"``): 4 launches forward and 4 backward around the two collectives, the
        combine (merge, header check, fault record, guarded running update) inside the kernels. None where the common
        path serves the call: one process, another backend, an empty batch (no kernel takes it: composite sends the
        same message), ``torch.compile`` / export / ``torch.func``, a subclass with its own combine or groups."""
        cls = type(self)
        if cls._combine is not SyncBatchNorm._combine or cls._group_size is not SyncBatchNorm._group_size:
            return None
        if s.group_size is not None:
            return None
        comb = self._combine()
        if not isinstance(comb, SyncCombine):  # one process: plain BatchNorm
            return None
        route = self._fused_route(x, mask, axis, s, "sync_forward")
        if route is None:
            return None
        ops, w, b, rm, rv, nbt, m = route
        stash: list = []
        y = _FusedSync.apply(x, w, b, m, s, ops, comb, (rm, rv, nbt, self.momentum), stash)
        self._report_fused(x, m, stash[0], stacklevel=8)
        return y
