"""The ``"triton"`` backend: :class:`batchnorm.kernels.backend.Backend` over the Triton kernels of :mod:`.kernels`.

Host code only allocates outputs and launches kernels: it never reads device data (no ``.item()``, ``bool``,
``.tolist()``, no host-to-device copy of Python numbers; scalars travel as kernel arguments), so a training or
eval step does not synchronize with the GPU. The non-finite guard runs inside :func:`.kernels.finalize`: the
running update is *selected* on the device, ``num_batches_tracked`` advances by the finite flag, and ``finite``
comes back as a 0-d bool tensor on the device.

Launches (:func:`launch_count` counts every one): ``reduce`` 2 (partials, finalize); ``apply`` 1; plain
``train_forward`` 3 (partials → finalize with the running update → apply); ``train_backward`` 3 (partials →
finalize with ``dγ, dβ`` → apply); ``eval_forward`` 1; ``backward_reduce`` 2; ``backward_apply`` 1;
``update_running`` 1; ``update_from_invstd`` 1 (the guard and running update of the native backend's GPU route,
after cuDNN); batch renorm's :meth:`TritonBackend.renorm_forward` / :meth:`~TritonBackend.renorm_backward`
3 + 3 (the warm-up ramp and the backward's affine constants formed in the finalize); SyncBatchNorm's
:meth:`TritonBackend.sync_forward` / :meth:`~TritonBackend.sync_backward` 3 + 3 around one collective each (the
message packed, and the backward finalized, by the last program of each feature block of the partials' launch;
the merge, header check and fault record in the finalize and in ``sync_sums``). Masks and
ghost groups add none (they are arguments of the same kernels).

Without a GPU, ``TRITON_INTERPRET=1`` (set before triton is first imported) runs the same kernels on CPU
tensors with Triton's interpreter: that is how the tests check them (correctness only, slow).

Shape: as :mod:`batchnorm.kernels.backend`; ``x`` must be viewable as ``(O, C, I)`` with one stride per part
(:func:`view`: contiguous, channels-last, ``axis=-1``, any rank), else :meth:`TritonBackend.supports` is False.

Example (on a CUDA tensor, or a CPU one under ``TRITON_INTERPRET=1``)::

    >>> from batchnorm.kernels.triton import TRITON, launch_count
    >>> before = launch_count()
    >>> y, stats, invstd, finite = TRITON.train_forward(x, Settings(axis=1), None, w, b, (rm, rv, nbt, 0.1))  # doctest: +SKIP
    >>> launch_count() - before                                                                           # doctest: +SKIP
    3

Reference: docs/gpu.md (kernels, launch sequences, compile table); Chan, Golub & LeVeque (1979) for the
merge of partial statistics; Ioffe & Szegedy (2015); Ioffe (2017) for batch renormalization.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import torch_ops as _t
from ..backend import Backend, Settings
from ..compose import check_cumulative

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Tile shapes and split policy (tests shrink them to exercise many tiles and splits on tiny tensors).
#: ``outer``: features outer in memory (NCHW); ``inner``/``inner_small``: features innermost (channels-last,
#: ``(N, C)``; ``inner_small`` for C ≤ 16); ``programs``: target number of programs of a partial-reduction
#: launch; ``max_splits``: the most splits per (feature block, group); ``finalize``: the feature block of the
#: finalize kernels.
TUNING = {"outer": (1024, 1), "inner_small": (128, 16), "inner": (32, 64), "programs": 512, "max_splits": 64,
          "finalize": 128}

_launches = [0]
_record: list | None = None  # set by .compile: launches are recorded (kernel, args, constexprs), not run


def launch_count() -> int:
    """Kernel launches made by this backend since the process started (tests difference two readings)."""
    return _launches[0]


def _k():
    from . import kernels

    return kernels


def _launch(kernel, grid, *args, **meta) -> None:
    _launches[0] += 1
    if _record is not None:
        _record.append((kernel, args, meta))
        return
    if type(kernel).__name__ == "InterpretedFunction":
        args = tuple(_scalar64(a) for a in args)
        meta = {k: _scalar64(v) for k, v in meta.items()}
    kernel[grid](*args, **meta)


def _scalar64(v):
    """Under the interpreter, a Python float as the float64 scalar its ``tl.float64`` parameter is when compiled
    (the interpreter would otherwise carry it as a float32 constant: ``momentum=0.1`` off by 1.5e-8 in float64)."""
    if type(v) is not float:
        return v
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    return tl.tensor(TensorHandle(np.array([v], dtype=np.float64), tl.float64), tl.float64)


def importable() -> bool:
    """triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when they were imported)."""
    if not importable():
        return False
    mod = __import__("sys").modules.get(__package__ + ".kernels")
    if mod is not None:
        return type(mod.apply).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """triton imports and something can run its kernels: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    return importable() and (os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available())


def _merge(sizes, strides):
    """``(size, stride)`` of consecutive dims viewed as one, or None when their strides do not chain."""
    size, stride = 1, 0
    for n, st in zip(reversed(sizes), reversed(strides)):
        if n == 1:
            continue
        if size == 1:
            size, stride = n, st
        elif st == stride * size:
            size *= n
        else:
            return None
    return size, stride


def view(t: torch.Tensor, axis: int):
    """``(O, I, stride_O, stride_C, stride_I)`` of ``t`` seen as ``(O, C, I)`` around ``axis``, or None."""
    outer = _merge(t.shape[:axis], t.stride()[:axis])
    inner = _merge(t.shape[axis + 1:], t.stride()[axis + 1:])
    if outer is None or inner is None:
        return None
    return outer[0], inner[0], outer[1], t.stride(axis), inner[1]


def _viewed(t: torch.Tensor, axis: int):
    """``(t, view)``, copying ``t`` to contiguous memory only when it has no ``(O, C, I)`` view."""
    v = view(t, axis)
    if v is None:
        t = t.contiguous()
        v = view(t, axis)
    return t, v


def _out_like(x: torch.Tensor, axis: int):
    y = torch.empty_like(x)
    v = view(y, axis)
    if v is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        v = view(y, axis)
    return y, v


def _fs(v: torch.Tensor | None):
    """A per-feature ``(G, C)`` / ``(1, C)`` / ``(C,)`` tensor with its (group, feature) strides (group 0 if one row)."""
    if v is None:
        return None, 0, 0
    if v.dim() == 1:
        return v, 0, v.stride(0)
    return v, (v.stride(0) if v.shape[0] > 1 else 0), (v.stride(1) if v.shape[1] > 1 else 0)


class _Geometry:
    """Everything about one call's layout: the (O, C, I) view, tiles, groups and splits."""

    __slots__ = ("x", "v", "O", "C", "I", "G", "R", "S", "tiles", "bp", "bc", "ncb", "f64", "sd", "inner", "base")

    def __init__(self, x: torch.Tensor, s: Settings, shrink: int = 1):
        self.x, self.v = _viewed(x, s.axis)
        self.O, self.I = self.v[0], self.v[1]
        self.C = x.shape[s.axis]
        if s.group_size is None:
            self.G, self.R = 1, self.O
        else:
            n = x.shape[0]
            self.G = _t.num_groups(n, s.group_size)
            self.R = s.group_size * (self.O // n)
        sc, si = self.v[3], self.v[4]
        self.inner = sc == 1 and self.C > 1 and not (si == 1 and self.I > 1)
        if self.inner:
            self.bp, self.bc = TUNING["inner_small"] if self.C <= 16 else TUNING["inner"]
        else:
            self.bp, self.bc = TUNING["outer"]
        self.base = self.bp
        self.bp = max(1, self.bp // shrink)
        self.ncb = -(-self.C // self.bc)
        tiles_total = max(1, -(-min(self.R, self.O) * self.I // self.bp))
        want = max(1, -(-TUNING["programs"] // (self.ncb * self.G)))
        splits = max(1, min(tiles_total, TUNING["max_splits"], want))
        self.tiles = -(-tiles_total // splits)
        self.S = -(-tiles_total // self.tiles)
        self.sd = _t.stat_dtype(x.dtype)
        self.f64 = self.sd == torch.float64

    def grid(self, bp: int):
        """The grid of an elementwise kernel with tiles of ``bp`` positions."""
        return (-(-self.O * self.I // bp), self.ncb)

    def tile(self, kernel: str) -> int:
        """BLOCK_P of an elementwise kernel: the layout's tile, a quarter of it where the full tile spills
        registers at sm_80/sm_90 (measured with the compile command): ghost-group gathers (7 per-feature operands
        per position in the backward) on features-innermost tiles, float64 backward on features-innermost
        tiles, and the ghost-group apply on features-outer tiles."""
        grouped = self.G > 1
        if kernel == "backward_apply" and self.inner and (grouped or self.f64):
            return max(1, self.base // 4)
        if kernel == "apply" and grouped and not self.inner:
            return max(1, self.base // 4)
        return self.base


def _finalize_block(f64: bool) -> int:
    """Feature block of the one-program kernels (finalize, update_running): twice as wide in float64, where 128
    spilled 8 bytes at sm_90 and 256 gives ptxas room for 111 registers and no spill (measured)."""
    return TUNING["finalize"] if not f64 else TUNING["finalize"] * 2


_dummies: dict = {}


def _dummy(device, dtype):
    """A one-element tensor standing in for an absent operand of a given pointer type (never read: its
    flag masks every load), cached per device so that a step allocates nothing for it."""
    key = (device, dtype)
    t = _dummies.get(key)
    if t is None:
        t = _dummies[key] = torch.empty(1, dtype=dtype, device=device)  # no fill: never read
    return t


_locks: dict = {}


def _lock_words(device, n: int):
    """``n`` int32 lock words, all 0, for the "last program of a feature block" kernels (SyncBatchNorm's
    :func:`.kernels.reduce_partial` with ``PACK`` and :func:`.kernels.backward_partial` with ``FIN``).

    Cached per device and stream: every launch that counts on them sets each word it used back to 0 before it
    ends, and launches on one stream run in order, so no step fills or allocates them (one zero fill when the
    cache first grows, outside the steady state)."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    t = _locks.get(key)
    if t is None or t.numel() < n:
        t = _locks[key] = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
    return t


def _mask_view(m: torch.Tensor | None, axis: int, device=None):
    if m is None:
        return _dummy(device, torch.bool), 0, 0
    m, v = _viewed(m, axis)
    return m, v[2], v[4]


class TritonBackend(Backend):
    """The four primitives, plain BN's fused sequences, batch renorm's and sync BN's as Triton kernels (CUDA; CPU
    interpreter)."""

    name = "triton"

    def supports(self, x: torch.Tensor, s: Settings | None = None) -> bool:
        """CUDA tensors (or CPU tensors under the interpreter) of float32/16, bfloat16, float64, not empty,
        viewable as ``(O, C, I)``; ghost groups need the feature axis off the batch axis."""
        from .. import dispatch

        if x.dtype not in _DTYPES or x.numel() == 0 or dispatch.device_type(x) not in ("cuda", "cpu"):
            return False
        runnable = x.device.type == "cpu" if interpreting() else (x.device.type == "cuda" and importable())
        if not runnable:
            return False
        if s is not None:
            if s.group_size is not None and s.axis == 0:
                return False
            if view(x, s.axis) is None:
                return False
        return True

    # -- building blocks ----------------------------------------------------------------------
    def _partials(self, x, s: Settings, m, pack=None, geo=None):
        """The split partials; ``pack = (message, back, header)``: SyncBatchNorm's forward, whose messages the same
        launch writes (:func:`.kernels.reduce_partial` with ``PACK``)."""
        geo = geo if geo is not None else _Geometry(x, s)
        mm, smo, smi = _mask_view(m, s.axis, x.device)
        part = torch.empty((4, geo.G, geo.S, geo.C), dtype=geo.sd, device=x.device)
        _O, _I, so, sc, si = geo.v
        extra = {}
        if pack is not None:
            message, back, header = pack
            number, call, dtype_code, positions = (int(v) for v in header)
            extra = {"msg_ptr": message, "back_ptr": back, "lock_ptr": _lock_words(x.device, geo.ncb),
                     "number": number, "call": call, "dtype_code": dtype_code, "positions": positions, "PACK": True}
        _launch(_k().reduce_partial, (geo.S, geo.ncb, geo.G), geo.x, mm, part,
                geo.O, geo.C, geo.I, so, sc, si, smo, smi, geo.R, geo.G, geo.S, geo.tiles, int(m is not None),
                F64=geo.f64, BLOCK_P=geo.bp, BLOCK_C=geo.bc, **extra)
        return part, geo

    def _finalize(self, part, geo, s: Settings, *, train, weight=None, bias=None, running=None, renorm=None,
                  gathered=None):
        """``gathered = (table, rec, sticky, check_few)``: SyncBatchNorm's merge of the gathered ranks' messages in
        place of ``part``'s splits (:func:`.kernels.finalize`, ``GATHERED``)."""
        dev = part.device
        stats = torch.empty((3, geo.G, geo.C), dtype=geo.sd, device=dev)
        rows = 9 if renorm is not None else 5  # (1/σ, scale, shift, new mean, new var) [+ (r, d, kz, bz)]
        aux = torch.empty((rows, geo.G, geo.C), dtype=geo.sd, device=dev) if train else stats
        rm = rv = nbt = None
        momentum, finite = 0.0, None
        if running is not None:
            rm, rv, nbt, momentum = running
            check_cumulative(momentum, nbt)
            finite = torch.empty((), dtype=torch.bool, device=dev)
        r_max = d_max = 1.0
        warmup = 0.0
        rmax_t = dmax_t = part
        limits_ptr = False
        if renorm is not None:
            rm, rv, r_max, d_max, warmup = renorm
            if isinstance(r_max, torch.Tensor) or isinstance(d_max, torch.Tensor):
                limits_ptr = True
                rmax_t = r_max if isinstance(r_max, torch.Tensor) else None
                dmax_t = d_max if isinstance(d_max, torch.Tensor) else None
                # a Python float next to a tensor limit: both travel as tensors of the device (no host read)
                rmax_t = rmax_t if rmax_t is not None else torch.full((), r_max, dtype=geo.sd, device=dev)
                dmax_t = dmax_t if dmax_t is not None else torch.full((), d_max, dtype=geo.sd, device=dev)
                r_max = d_max = 1.0
                warmup = 0.0
            elif warmup and nbt is None:
                raise ValueError("BatchRenorm's warm-up ramp reads num_batches_tracked; pass it in running, or "
                                 "warmup_steps=0.")
        dummy = part
        splits = geo.S
        sync = {}
        if gathered is not None:
            part, rec, sticky, check_few = gathered
            dummy = stats  # an operand of the statistics' dtype for the absent ones
            splits = part.shape[0]  # one "split" per rank
            sync = {"rec_ptr": rec, "sticky": int(sticky), "check_few": int(check_few), "GATHERED": True}
        _launch(_k().finalize, (1,), part, stats, aux, weight if weight is not None else dummy,
                bias if bias is not None else dummy, rm if rm is not None else dummy, rv if rv is not None else dummy,
                nbt if nbt is not None else _dummy(dev, torch.long),
                finite if finite is not None else _dummy(dev, torch.bool), rmax_t, dmax_t,
                geo.C, geo.G, splits, float(s.eps), float(momentum if momentum is not None else 0.0),
                float(r_max), float(d_max), float(warmup), int(weight is not None), int(bias is not None), int(s.save),
                int(nbt is not None), TRAIN=train, UPDATE=running is not None,
                CUMULATIVE=running is not None and momentum is None, RENORM=renorm is not None, LIMITS_PTR=limits_ptr,
                F64=geo.f64, BLOCK_C=_finalize_block(geo.f64), **sync)
        return stats, aux, finite

    def _apply(self, geo, s: Settings, a, b, *, eval_=False, weight=None, bias=None):
        y, yv = _out_like(geo.x, s.axis)
        _O, _I, sxo, sxc, sxi = geo.v
        a, sag, sac = _fs(a)
        b, sbg, sbc = _fs(b)
        f64 = geo.f64 or a.dtype == torch.float64 or b.dtype == torch.float64
        dummy = a
        bp = geo.tile("apply")
        _launch(_k().apply, geo.grid(bp), geo.x, y, a, b, weight if weight is not None else dummy,
                bias if bias is not None else dummy, geo.O, geo.C, geo.I, sxo, sxc, sxi, yv[2], yv[3], yv[4],
                sag, sac, sbg, sbc, geo.R, float(s.eps), float(s.negative_slope), s.code, int(weight is not None),
                int(bias is not None), FUSED_ACT=s.code != 0, EVAL=eval_, GROUPED=geo.G > 1 and not eval_, F64=f64,
                BLOCK_P=bp, BLOCK_C=geo.bc)
        return y

    def _pq(self, s: Settings, p, q, zscale, zshift, fused_save: bool, dummy=None, clamp=None):
        """The four per-feature operands of the backward kernels, with strides and flags (``fused_save``: the kernels
        form ``p = zshift``, ``q = 1/zscale``, ``zscale`` clamped at ``±eps`` unless ``clamp`` is False)."""
        p, spg, spc = _fs(p)
        q, sqg, sqc = _fs(q)
        zs, szsg, szsc = _fs(zscale)
        zb, szbg, szbc = _fs(zshift)
        anyt = next((t for t in (p, q, zs, zb) if t is not None), dummy)  # unused operands point at a real tensor
        flags = (s.code, int(zs is not None), int(zb is not None), int(fused_save if clamp is None else clamp))
        ptrs = tuple(t if t is not None else anyt for t in (p, q, zs, zb))
        return ptrs, (spg, spc, sqg, sqc, szsg, szsc, szbg, szbc), flags, fused_save

    def _backward_sums(self, dy, t, s: Settings, pq, fused=None, sums=None, fold=False):
        """``(Σ dz, Σ dz·x̂)`` ``(2, G, C)``; ``fused = (count, invstd, weight, rd, dγ-like, dβ-like)`` also
        gives ``k, mean(dz), mean(dz·x̂)`` ``(3, G, C)`` and ``dγ, dβ``. ``sums``: where the sums go (SyncBatchNorm:
        the front of its backward message, float64), else a new tensor. ``fold`` (with ``fused``): the finalize
        runs in the partials' launch (:func:`.kernels.backward_partial` with ``FIN``), one launch instead of two."""
        geo = _Geometry(t, s)
        if geo.inner and geo.f64:  # float64 on features-innermost tiles: a quarter of the tile (no spill)
            geo = _Geometry(t, s, shrink=4)
        dy, dv = _viewed(dy, s.axis)
        ptrs, strides, flags, pq_wb = pq
        part = torch.empty((2, geo.G, geo.S, geo.C), dtype=geo.sd, device=t.device)
        if sums is None:
            sums = torch.empty((2, geo.G, geo.C), dtype=geo.sd, device=t.device)
        kbuf = dw = db = None
        fin = {}
        if fused is not None:
            count, invstd, weight, rd, dw_like, db_like = fused
            kbuf = torch.empty((3, geo.G, geo.C), dtype=geo.sd, device=t.device)
            dw = torch.empty(dw_like.shape, dtype=dw_like.dtype, device=t.device) if dw_like is not None else None
            db = torch.empty(db_like.shape, dtype=db_like.dtype, device=t.device) if db_like is not None else None
            count, scg, scc = _fs(count)
            invstd = invstd.contiguous()
            fin_ptrs = (sums, kbuf, count, invstd, weight if weight is not None else kbuf,
                        rd if rd is not None else kbuf, dw if dw is not None else kbuf, db if db is not None else kbuf)
            fin_flags = (scg, scc, int(weight is not None), int(s.save), int(dw is not None), int(db is not None))
            if fold:
                names = ("sums_ptr", "k_ptr", "cnt_ptr", "invstd_ptr", "w_ptr", "rd_ptr", "dw_ptr", "db_ptr")
                fin = dict(zip(names, fin_ptrs))
                fin.update(zip(("scg", "scc", "has_w", "w_clamp", "want_dw", "want_db"), fin_flags))
                fin.update(lock_ptr=_lock_words(t.device, geo.ncb), FIN=True, RENORM=rd is not None)
        _launch(_k().backward_partial, (geo.S, geo.ncb, geo.G), dy, geo.x, part, *ptrs,
                geo.O, geo.C, geo.I, dv[2], dv[3], dv[4], geo.v[2], geo.v[3], geo.v[4], *strides,
                geo.R, geo.G, geo.S, geo.tiles, float(s.eps), float(s.negative_slope), *flags,
                SAVE=bool(s.save), FUSED_ACT=s.code != 0, PQ_WB=pq_wb, F64=geo.f64, BLOCK_P=geo.bp, BLOCK_C=geo.bc,
                **fin)
        if fused is None:
            _launch(_k().backward_finalize, (-(-geo.C // TUNING["finalize"]),), part, sums, sums, sums, sums, sums,
                    sums, sums, sums, geo.C, geo.G, geo.S, 0, 0, float(s.eps), 0, 0, 0, 0,
                    FUSED=False, RENORM=False, F64=geo.f64, BLOCK_C=TUNING["finalize"])
        elif not fold:
            scg, scc, has_w, w_clamp, want_dw, want_db = fin_flags
            _launch(_k().backward_finalize, (-(-geo.C // TUNING["finalize"]),), part, *fin_ptrs,
                    geo.C, geo.G, geo.S, scg, scc, float(s.eps), has_w, w_clamp, want_dw, want_db,
                    FUSED=True, RENORM=rd is not None, F64=geo.f64, BLOCK_C=TUNING["finalize"])
        return geo, dy, dv, sums, kbuf, dw, db

    def _backward_dx(self, geo, dy, dv, s: Settings, pq, k, mdz, mdzx, m):
        dx, xv = _out_like(geo.x, s.axis)
        ptrs, strides, flags, pq_wb = pq
        mm, smo, smi = _mask_view(m, s.axis, dy.device)
        k, skg, skc = _fs(k)
        mdz, smg, smc = _fs(mdz)
        mdzx, sng, snc = _fs(mdzx)
        bp = geo.tile("backward_apply")
        _launch(_k().backward_apply, geo.grid(bp), dy, geo.x, mm, dx, *ptrs, k, mdz,
                mdzx, geo.O, geo.C, geo.I, dv[2], dv[3], dv[4], geo.v[2], geo.v[3], geo.v[4], smo, smi,
                xv[2], xv[3], xv[4], *strides, skg, skc, smg, smc, sng, snc, geo.R, float(s.eps),
                float(s.negative_slope), *flags, int(m is not None), SAVE=bool(s.save), FUSED_ACT=s.code != 0,
                PQ_WB=pq_wb, GROUPED=geo.G > 1, F64=geo.f64, BLOCK_P=bp, BLOCK_C=geo.bc)
        return dx

    # -- primitives ---------------------------------------------------------------------------
    def reduce(self, x, s: Settings, m):
        part, geo = self._partials(x, s, m)
        stats, _, _ = self._finalize(part, geo, s, train=False)
        return stats[0], stats[1], stats[2]

    def apply(self, x, s: Settings, scale, shift):
        return self._apply(_Geometry(x, s), s, scale, shift)

    def backward_reduce(self, dy, t, s: Settings, p, q, zscale=None, zshift=None):
        pq = self._pq(s, p, q, zscale, zshift, False)
        sums = self._backward_sums(dy, t, s, pq)[3]
        return sums[0], sums[1]

    def backward_apply(self, dy, t, s: Settings, p, q, k, mean_dz, mean_dzx, m, zscale=None, zshift=None):
        geo = _Geometry(t, s)
        dy, dv = _viewed(dy, s.axis)
        return self._backward_dx(geo, dy, dv, s, self._pq(s, p, q, zscale, zshift, False), k, mean_dz, mean_dzx, m)

    # -- fused sequences ----------------------------------------------------------------------
    def train_forward(self, x, s: Settings, m, weight, bias, running=None):
        """Plain BN in 3 launches: partial reduce → finalize (Chan merge, 1/σ, scale/shift, guarded running
        update, ``num_batches_tracked``) → apply. ``finite``: a 0-d bool tensor on the device (None without
        running buffers)."""
        part, geo = self._partials(x, s, m)
        stats, aux, finite = self._finalize(part, geo, s, train=True, weight=_det(weight), bias=_det(bias),
                                            running=running)
        y = self._apply(geo, s, aux[1], aux[2])
        return y, stats, aux[0], finite

    def train_backward(self, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs):
        """Plain BN's backward in 3 launches: partials of ``(Σ dz, Σ dz·x̂)`` → finalize (``k``, means, ``dγ``,
        ``dβ``) → ``dx``."""
        return self._train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs, None)

    def _train_backward(self, dy, t, s, stats, invstd, weight, bias, count, m, needs, rd, sync=None):
        """``sync = (message, gather, rec, sticky)``: SyncBatchNorm's backward (:meth:`sync_backward`)."""
        if count is None:
            count = stats[0]
        w, b = _det(weight), _det(bias)
        if rd is None:
            # p, q: the saved mean and 1/σ, or (memory="save") β and 1/clamp(γ), formed in the kernels
            pq = self._pq(s, None, None, w, b, True, invstd) if s.save else self._pq(s, stats[1], invstd, w, b, False)
        else:  # batch renorm: z = x̂·(γ'·r) + (β + γ'·d) per group (γ' clamped with memory="save")
            if s.save or s.code != 0:
                zs, zb = (rd[2], rd[3]) if rd.shape[0] >= 4 else _renorm_affine(w, b, rd, s)  # the forward's kz, bz
            if s.save:  # x̂ = (y' − bz)/kz formed in the kernels (kz is already γ'·r with γ' clamped: no second clamp)
                pq = self._pq(s, None, None, zs, zb, True, invstd, clamp=False)
            elif s.code == 0:
                pq = self._pq(s, stats[1], invstd, None, None, False)
            else:
                pq = self._pq(s, stats[1], invstd, zs, zb, False)
        want_dw = bool(needs[1]) and weight is not None
        want_db = bool(needs[2]) and bias is not None
        fused = (count, invstd, w, rd, weight if want_dw else None, bias if want_db else None)
        out = None
        if sync is not None:  # the sums go straight into the front of the backward message (its tail is written)
            g, c = invstd.shape
            out = sync[0][:2 * g * c].view(2, g, c)
        geo, dyv, dv, sums, kbuf, dw, db = self._backward_sums(dy, t, s, pq, fused, out, fold=sync is not None)
        if sync is not None and needs[0]:
            # the local k = γ'·(1/σ) is kbuf[0]; the means of the sums over ranks replace kbuf[1], kbuf[2]
            message, gather, rec, sticky = sync
            table = gather(message)
            count, scg, scc = _fs(count)
            _launch(_k().sync_sums, (1,), table, kbuf, count, rec, geo.C, geo.G, table.shape[0], scg, scc,
                    int(sticky), BLOCK_C=_finalize_block(True))
        dx = self._backward_dx(geo, dyv, dv, s, pq, kbuf[0], kbuf[1], kbuf[2], m) if needs[0] else None
        return dx, dw, db

    def eval_forward(self, x, s: Settings, weight, bias, running_mean, running_var):
        """Eval BN in one launch: ``a = γ/sqrt(rv + eps)``, ``b = β − rm·a`` formed inside the apply kernel."""
        if s.eps < 0 or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
            from ..composite import COMPOSITE  # an autograd graph is needed: the differentiable composite ops

            return COMPOSITE.eval_forward(x, s, weight, bias, running_mean, running_var)
        geo = _Geometry(x, s.replace(group_size=None))
        geo.f64 = geo.f64 or running_mean.dtype == torch.float64 or running_var.dtype == torch.float64
        return self._apply(geo, s.replace(group_size=None), running_var, running_mean, eval_=True,
                           weight=_det(weight), bias=_det(bias))

    def update_running(self, running_mean, running_var, mean, var, count, momentum, num_batches_tracked=None):
        """The running update of :func:`batchnorm.functional.update_running` in one launch (guard on the device)."""
        check_cumulative(momentum, num_batches_tracked)
        g, c = mean.shape
        sd = mean.dtype
        finite = torch.empty((), dtype=torch.bool, device=mean.device)
        count, scg, scc = _fs(count)
        mean, smg, smc = _fs(mean)
        var, svg, svc = _fs(var)
        nbt = num_batches_tracked
        _launch(_k().update_running, (1,), mean, var, count, running_mean, running_var,
                nbt if nbt is not None else _dummy(mean.device, torch.long), finite, c, g, smg, smc, svg, svc, scg, scc,
                float(momentum if momentum is not None else 0.0), int(nbt is not None),
                CUMULATIVE=momentum is None, F64=sd == torch.float64, BLOCK_C=_finalize_block(sd == torch.float64))
        return finite

    def update_from_invstd(self, running_mean, running_var, num_batches_tracked, mean, invstd, n, momentum, eps):
        """The non-finite guard and running update of a plain step whose statistics ATen computed (the native
        backend's GPU route: cuDNN without running buffers returns the batch mean and ``1/σ``), in one launch:
        ``σ²_B = 1/invstd² − eps``, unbiased by ``n/(n − 1)``; ``num_batches_tracked += finite``; the update selected
        on the device. Returns ``finite``, a 0-d bool device tensor (:func:`.kernels.update_from_invstd`).

        Shape: ``mean, invstd, running_mean, running_var`` ``(C,)`` (contiguous); ``n`` values per feature (an int).
        """
        check_cumulative(momentum, num_batches_tracked)
        dev = mean.device
        finite = torch.empty((), dtype=torch.bool, device=dev)
        nbt = num_batches_tracked
        _launch(_k().update_from_invstd, (1,), mean, invstd, running_mean, running_var,
                nbt if nbt is not None else _dummy(dev, torch.long), finite, mean.shape[0], float(n), float(eps),
                float(momentum if momentum is not None else 0.0), int(nbt is not None), CUMULATIVE=momentum is None,
                BLOCK_C=TUNING["finalize"])
        return finite

    # -- batch renormalization (Ioffe 2017) as fused sequences ----------------------------------
    def renorm_forward(self, x, s: Settings, m, weight, bias, running_mean, running_var, r_max, d_max, running=None,
                       warmup=0):
        """Batch renorm's training forward in 3 launches: ``(y, stats, invstd, rd, finite)``; ``rd`` is ``(4, G, C)``:
        ``r, d`` and the backward's ``kz = γ'·r``, ``bz = β + γ'·d``.

        The finalize forms ``r = clamp(σ_B/σ, 1/r_max, r_max)`` and ``d = clamp((μ_B − μ)/σ, ±d_max)`` from the
        running estimates *before* this step's update (the rule of ``layers.renorm.RenormCombine``), then updates
        them (``running`` as in :meth:`train_forward`). ``r_max, d_max``: floats or 0-d device tensors; with float
        limits, ``warmup = T > 0`` ramps them inside the kernel from ``t = num_batches_tracked`` (before the update):
        ``1 + (r_max − 1)·min(t/T, 1)`` and ``d_max·min(t/T, 1)`` (``BatchRenorm.current_limits``), no extra launch.
        """
        part, geo = self._partials(x, s, m)
        stats, aux, finite = self._finalize(part, geo, s, train=True, weight=_det(weight), bias=_det(bias),
                                            running=running, renorm=(running_mean, running_var, r_max, d_max,
                                                                     warmup))
        y = self._apply(geo, s, aux[1], aux[2])
        return y, stats, aux[0], aux[5:9], finite

    def renorm_backward(self, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs, rd):
        """Batch renorm's backward in 3 launches (``rd = (r, d)`` are constants: stop-gradient); ``(dx, dγ, dβ)``."""
        return self._train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs, rd)

    # -- SyncBatchNorm: one collective per direction between the kernels ----------------------------
    def sync_forward(self, x, s: Settings, m, weight, bias, running, header, gather, rec, sticky, check_few):
        """SyncBatchNorm's training forward in 3 launches around one collective: partial reduce, whose last program
        per feature block packs this rank's message ``[mean, m2, count, header]`` (float64) and the tail of its
        backward message (:func:`.kernels.reduce_partial` with ``PACK``) → ``gather(message)`` (the all-gather, ``(world, 2·G·C + G + 6)``) → finalize over the gathered ranks (Chan
        merge in float64; the header check and the global-count check on the device, a faulty step's statistics NaN,
        the fault record written to ``rec``; ``1/σ``, scale/shift, the guarded running update) → apply.

        ``header = (layer number, step, dtype code, positions)``; ``sticky``: ``rec`` holds a record not reported
        yet (a fault there is kept); ``check_few``: the "more than 1 value" check can fail (a mask, or ≤ 1 position
        on this rank). Returns ``(y, stats, invstd, finite, back)``: ``stats`` the merged ``(count, mean, var)``,
        ``back`` the backward message whose tail is written (for :meth:`sync_backward`).
        """
        geo = _Geometry(x, s)
        size = 2 * geo.G * geo.C + geo.G + 6
        message = torch.empty(size, dtype=torch.float64, device=x.device)
        back = torch.empty(size, dtype=torch.float64, device=x.device)
        part, geo = self._partials(x, s, m, pack=(message, back, header), geo=geo)
        table = gather(message)
        stats, aux, finite = self._finalize(part, geo, s, train=True, weight=_det(weight), bias=_det(bias),
                                            running=running, gathered=(table, rec, sticky, check_few))
        y = self._apply(geo, s, aux[1], aux[2])
        return y, stats, aux[0], finite, back

    def sync_backward(self, dy, t, s: Settings, stats, invstd, weight, bias, count, m, needs, back, gather, rec,
                      sticky):
        """SyncBatchNorm's backward in 3 launches around one collective: partials of ``(Σ dz, Σ dz·x̂)`` whose last
        program per feature block runs the backward finalize (the sums written into ``back``, the message
        :meth:`sync_forward` prepared; the local ``k``, ``dγ``, ``dβ``; :func:`.kernels.backward_partial` with
        ``FIN``) → ``gather(back)`` → :func:`.kernels.sync_sums` (sums over ranks, header check, fault record,
        ``mean(dz)``, ``mean(dz·x̂)`` with the global count) → ``dx``. Without ``needs[0]`` no gather (the rule of
        ``kernels.compose._backward_steps``): 1 launch for ``dγ, dβ``."""
        return self._train_backward(dy, t, s, stats, invstd, weight, bias, count, m, needs, None,
                                    (back, gather, rec, sticky))


def _det(t):
    return t.detach() if t is not None else None


def _renorm_affine(w, b, rd, s: Settings):
    """``kz = γ'·r``, ``bz = β + γ'·d`` from ``rd = (r, d)`` (a caller's own ``(2, G, C)``; the forward gives all four)."""
    wc = (_clamp_weight(w, s.eps, rd) if s.save else w.to(rd.dtype)) if w is not None else None
    zs = wc * rd[0] if wc is not None else rd[0]
    zb = rd[1] * wc if wc is not None else rd[1]
    if b is not None:
        zb = zb + b.to(rd.dtype)
    return zs, zb


def _clamp_weight(w, eps, like):
    w = w.to(like.dtype)
    return torch.where(w.abs() < eps, torch.where(w < 0, -eps, eps).to(w.dtype), w)


TRITON = TritonBackend()
