"""The Triton kernels of the ``"triton"`` backend (imported lazily: ``import batchnorm`` never imports triton).

Every tensor reaches a kernel as a strided ``(O, C, I)`` view (:func:`batchnorm.kernels.triton.backend.view`):
``O`` merges the dimensions before the feature axis, ``I`` those after it, each with one stride, so NCHW,
channels-last 2-D/3-D, ``axis=-1`` and any rank run the same code. A *position* ``p`` of one feature is
``(o, i) = (p // I, p % I)``; ghost group ``g`` owns the ``R`` rows ``o ∈ [g·R, (g+1)·R)`` (``R = O`` without
groups). Tiles are ``[BLOCK_P, BLOCK_C]`` (positions × features): ``BLOCK_C = 1`` with long position runs when
the features are outer in memory (NCHW), ``BLOCK_C`` = 16 or 64 when they are innermost (channels-last, ``(N, C)``).

Kernels (docs/gpu.md explains the launch sequences):

* :func:`reduce_partial` — per (split, feature block, group): Welford-style ``(count, mean, m2)`` of each
  tile (two passes over the tile in registers), merged tile by tile with Chan's formula;
* :func:`finalize` — one program: Chan merge of the splits, then (train mode) the variance, ``1/σ``, the
  renorm ``r, d`` correction, scale/shift, and the running update selected on the device (the non-finite
  guard) with ``num_batches_tracked`` advanced by the finite flag;
* :func:`apply` — ``y = act(x · a + b)``; eval mode forms ``a, b`` from the running estimates in-kernel;
* :func:`backward_partial` / :func:`backward_finalize` / :func:`backward_apply` — the same three steps for
  ``(Σ dz, Σ dz·x̂)`` and ``dx = k·(dz − m·(mean(dz) + x̂·mean(dz·x̂)))``, with ``dγ, dβ`` in the finalize;
* SyncBatchNorm: :func:`reduce_partial` with ``PACK`` (the last program of each feature block merges the split
  partials into this rank's message, :func:`_pack_stats`; the headers, :func:`_pack_headers`), :func:`finalize`
  with ``GATHERED`` (the gathered messages merged as its splits, the header check and the fault record),
  :func:`backward_partial` with ``FIN`` (the backward finalize in the last program of each feature block, the sums
  written into the backward message) and :func:`sync_sums` (the backward sums over ranks → ``mean(dz)``,
  ``mean(dz·x̂)``). The "last program" is found with one atomic counter per feature block
  (:func:`_last_of_block`), which that program sets back to 0.

Activation codes are those of :data:`batchnorm.activations.TABLE` (0 identity … 7 relu6); the
forward/derivative formulas are the table's, written in Triton.
"""

import inspect

import triton
import triton.language as tl

#: The strides of the big operands (x, y, dy, dx, the saved tensor): specialized by triton on the value 1 (the
#: layout: features or positions contiguous), which lets it vectorize. Every other integer argument (sizes, the
#: strides of per-feature vectors and of the mask, runtime 0/1 flags, the activation code) is never specialized.
_LAYOUT_STRIDES = ("sxo", "sxc", "sxi", "syo", "syc", "syi", "sdo", "sdc", "sdi", "sto", "stc", "sti")
#: Pointers specialized on 16-byte alignment (the big operands and the partials); per-feature vectors are not.
_BIG_POINTERS = ("x_ptr", "y_ptr", "dy_ptr", "t_ptr", "dx_ptr", "m_ptr", "part_ptr")


def _kernel(fn):
    """``triton.jit`` with the specialization policy of this backend (:data:`_LAYOUT_STRIDES`): a value of 1 or a
    multiple of 16 in a size or flag would otherwise compile a new kernel. Runtime flags select optional operands
    through load masks, and ``act`` (the activation code, uniform over a launch) a branch, so one compiled kernel
    serves every activation. The big operands' pointers keep triton's 16-byte-alignment specialization
    (:data:`_BIG_POINTERS`). The set of compiled variants
    stays finite and known: ``python -m batchnorm.kernels.triton compile`` builds all of them ahead of time."""
    params = inspect.signature(fn).parameters
    # float scalars (eps, momentum, ...) are annotated tl.float64: exact for float64 calls, cast to float32 once at
    # the top of a float32 kernel
    ints = [n for n, p in params.items() if p.annotation is inspect.Parameter.empty and not n.endswith("_ptr")]
    small = [n for n in params if n.endswith("_ptr") and n not in _BIG_POINTERS]
    return triton.jit(fn, do_not_specialize=[n for n in ints if n not in _LAYOUT_STRIDES],
                      do_not_specialize_on_alignment=ints + small)


@triton.jit
def _ct(v, F64: tl.constexpr):
    """Cast to the compute dtype: float64 for float64 calls, else float32."""
    if F64:
        return tl.cast(v, tl.float64)
    else:
        return tl.cast(v, tl.float32)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _act(z, ACT, slope):
    """The forward of activation code ``ACT`` (a runtime scalar, uniform over the launch; NaN propagates as in torch)."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = z * _sigmoid(z)
    elif ACT == 4:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 5:
        z = _sigmoid(z)
    elif ACT == 6:
        z = _tanh(z)
    elif ACT == 7:
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    return z


@triton.jit
def _dact(z, ACT, slope):
    """``d act / dz`` (at a kink the left value, as torch: relu'(0) = 0, relu6'(6) = 0)."""
    one = z * 0.0 + 1.0
    if ACT == 1:
        g = tl.where(z > 0, one, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, one, one * slope)
    elif ACT == 3:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        g = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 5:
        s = _sigmoid(z)
        g = s * (1.0 - s)
    elif ACT == 6:
        t = _tanh(z)
        g = 1.0 - t * t
    elif ACT == 7:
        g = tl.where((z > 0) & (z < 6.0), one, 0.0)
    else:
        g = one
    return g


@triton.jit
def _feature(ptr, g, cs, sg, sc, cmask, F64: tl.constexpr):
    """A per-(group, feature) value as a ``[BLOCK_C]`` vector (``g`` a scalar group index)."""
    return _ct(tl.load(ptr + g * sg + cs * sc, mask=cmask, other=0.0), F64)


@triton.jit
def _feature2(ptr, g, cs, sg, sc, v2, F64: tl.constexpr):
    """A per-(group, feature) value gathered per position (``g`` a ``[BLOCK_P]`` vector): ``[BLOCK_P, BLOCK_C]``."""
    return _ct(tl.load(ptr + g[:, None] * sg + cs[None, :] * sc, mask=v2, other=0.0), F64)


@triton.jit
def _opt(ptr, g, cs, sg, sc, cmask, present, default, F64: tl.constexpr):
    """An optional per-feature vector: loaded where ``present`` (a runtime 0/1), else ``default`` (no memory read)."""
    return _ct(tl.load(ptr + g * sg + cs * sc, mask=cmask & (present != 0), other=default), F64)


@triton.jit
def _opt2(ptr, g, cs, sg, sc, v2, present, default, F64: tl.constexpr):
    """:func:`_opt` gathered per position (``g`` a ``[BLOCK_P]`` vector)."""
    return _ct(tl.load(ptr + g[:, None] * sg + cs[None, :] * sc, mask=v2 & (present != 0), other=default), F64)


@triton.jit
def _clamped(w, eps, clamp):
    """memory="save" (``clamp`` = 1): ``|γ| < eps`` is used as ``±eps`` (sign kept, sign(0) = +1); the rule of
    ``functional._affine``."""
    return tl.where((clamp != 0) & (tl.abs(w) < eps), tl.where(w < 0, -eps, eps), w)


@triton.jit
def _tile(NO, C, NI, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """An elementwise program's tile: positions ``(o, i)`` × features ``cs``, with their masks (int64 offsets)."""
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = pos < NO * NI
    cmask = cs < C
    v2 = pmask[:, None] & cmask[None, :]
    return cs, pmask, cmask, v2, (pos // NI).to(tl.int64), (pos % NI).to(tl.int64), cs.to(tl.int64)


@triton.jit
def _chan(n_a, k_a, r_a, m2_a, n_b, k_b, r_b, m2_b):
    """Chan, Golub & LeVeque's merge of two shifted summaries ``(count, shift k, mean − k, m2)``.

    ``δ = (k_b − k_a) + (r_b − r_a)`` (shifts of nearby data subtract exactly), ``r = r_a + δ·n_b/n``,
    ``m2 = m2_a + m2_b + δ²·n_a·n_b/n``; the result keeps ``k_a`` (``k_b`` when side a is empty).
    """
    k_a = tl.where(n_a > 0, k_a, k_b)
    n = n_a + n_b
    frac = n_b / tl.maximum(n, 1.0)
    delta = (k_b - k_a) + (r_b - r_a)
    return n, k_a, r_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _splits(part_ptr, g, G, S, C, cs, cmask, F64: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan merge of the ``S`` split partials ``part[(count, shift, mean − shift, m2), g, s, c]`` of group ``g``."""
    n = _ct(tl.zeros([BLOCK_C], tl.float32), F64)
    k = n
    r = n
    m2 = n
    for s in range(0, S):
        idx = (g * S + s) * C + cs
        pp = G * S * C
        n, k, r, m2 = _chan(n, k, r, m2, _ct(tl.load(part_ptr + idx, mask=cmask, other=0.0), F64),
                            _ct(tl.load(part_ptr + pp + idx, mask=cmask, other=0.0), F64),
                            _ct(tl.load(part_ptr + 2 * pp + idx, mask=cmask, other=0.0), F64),
                            _ct(tl.load(part_ptr + 3 * pp + idx, mask=cmask, other=0.0), F64))
    return n, k, r, m2


@triton.jit
def _ranks(tab_ptr, g, G, W, C, cs, cmask, poison, F64: tl.constexpr, BLOCK_C: tl.constexpr):
    """SyncBatchNorm: ``(count, mean, m2)`` of group ``g`` merged over the ``W`` gathered messages (rows of
    ``2·G·C + G + 6`` values: ``[mean, m2, count, header]``), by Chan's formula in float64 (each rank's mean is its
    shift, so every term is centred; an empty rank adds nothing); ``poison`` (NaN or 0) is added to mean and m2."""
    row_len = 2 * G * C + G + 6
    n = tl.zeros([BLOCK_C], tl.float64)
    k = n
    r = n
    m2 = n
    zero = n
    for w in range(0, W):
        row = tab_ptr + w * row_len
        mean_w = tl.load(row + g * C + cs, mask=cmask, other=0.0).to(tl.float64)
        m2_w = tl.load(row + G * C + g * C + cs, mask=cmask, other=0.0).to(tl.float64)
        n_w = tl.load(row + 2 * G * C + g + cs * 0, mask=cmask, other=0.0).to(tl.float64)
        n, k, r, m2 = _chan(n, k, r, m2, n_w, mean_w, zero, m2_w)
    return _ct(n, F64), _ct(k + r + poison, F64), _ct(m2 + poison, F64)


@triton.jit
def _sync_fault(tab_ptr, rec_ptr, W, G, C, sticky, check_few):
    """SyncBatchNorm's agreement check on the device, over the ``W`` gathered messages (``(W, 2·G·C + G + 6)``).

    A fault: the first five header fields ``(direction, layer, step, features, dtype)`` differ between ranks (code 1),
    or (``check_few``) the smallest global count per group is ≤ 1 and not every rank is empty (code 2). Writes the
    record ``[code, smallest count, W × header]`` to ``rec_ptr`` unless ``sticky`` and a fault is already there (the
    first fault is the one reported; ``layers.sync._SyncState``); returns the 0-d term added to the statistics: NaN
    for a faulty step, else 0. The rule of ``SyncCombine._fault``.
    """
    row_len = 2 * G * C + G + 6
    head = 2 * G * C + G
    j = tl.arange(0, 8)
    first = tl.load(tab_ptr + head + j, mask=j < 5, other=0.0).to(tl.float64)
    bad = tl.zeros([8], tl.int32)
    most = tl.zeros([8], tl.float64)
    for w in range(0, W):
        hw = tl.load(tab_ptr + w * row_len + head + j, mask=j < 6, other=0.0).to(tl.float64)
        bad = bad | tl.where((j < 5) & (hw != first), 1, 0)
        most = tl.maximum(most, tl.where(j == 5, hw, 0.0))
    least = tl.full([8], 1.0e300, tl.float64)
    for g in range(0, G):
        ng = tl.zeros([8], tl.float64)
        for w in range(0, W):
            ng += tl.load(tab_ptr + w * row_len + 2 * G * C + g + j * 0).to(tl.float64)
        least = tl.minimum(least, ng)
    faulty = tl.max(bad, axis=0) != 0
    n_min = tl.min(least, axis=0)
    # (the tensor first: ``check_few`` may be a constant, sync_sums' 0)
    few = (n_min <= 1.0) & ~((n_min == 0.0) & (tl.max(most, axis=0) == 0.0)) & (check_few != 0)
    code = tl.where(faulty, 1.0, tl.where(few, 2.0, 0.0))
    old = tl.load(rec_ptr, mask=sticky != 0, other=0.0)
    write = (j * 0 + tl.where(old == 0, 1, 0)) != 0  # as a vector (the interpreter's & wants equal shapes)
    out_ty = rec_ptr.dtype.element_ty
    tl.store(rec_ptr + j, tl.where(j == 0, code, n_min).to(out_ty), mask=(j < 2) & write)
    for w in range(0, W):
        hw = tl.load(tab_ptr + w * row_len + head + j, mask=j < 6, other=0.0)
        tl.store(rec_ptr + 2 + w * 6 + j, hw.to(out_ty), mask=(j < 6) & write)
    return tl.where(faulty | few, float("nan"), 0.0)


@_kernel
def reduce_partial(
    x_ptr, m_ptr, part_ptr,
    NO, C, NI, sxo, sxc, sxi, smo, smi, R, G, S, TILES, has_mask,
    F64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    msg_ptr=None, back_ptr=None, lock_ptr=None, number=0, call=0, dtype_code=0, positions=0,
    PACK: tl.constexpr = False,
):
    """``part[(count, shift, mean − shift, m2), g, split, c]`` over this program's ``TILES`` tiles of group ``g``.

    ``PACK`` (SyncBatchNorm's forward; keyword-only, so the other calls keep their specializations): the last
    program of each feature block to finish (:func:`_last_of_block`) merges the block's ``S·G`` partials into this
    rank's message (:func:`_pack_stats`), and program ``(0, 0, 0)`` writes the message headers (:func:`_pack_headers`):
    the partial reduce and the message in one launch."""
    pid_s = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.program_id(2)
    cmask = cs < C
    o0 = g * R
    npos = tl.minimum(R, NO - o0) * NI
    acc_n = _ct(tl.zeros([BLOCK_C], dtype=tl.float32), F64)
    acc_k = acc_n
    acc_r = acc_n
    acc_m2 = acc_n
    c_off = cs.to(tl.int64) * sxc
    for t in range(0, TILES):
        p = (pid_s * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        inside = p < npos
        o = (o0 + p // NI).to(tl.int64)
        i = (p % NI).to(tl.int64)
        keep = tl.load(m_ptr + o * smo + i * smi, mask=inside & (has_mask != 0), other=1) != 0
        v2 = (inside & keep)[:, None] & cmask[None, :]
        x = _ct(tl.load(x_ptr + (o * sxo + i * sxi)[:, None] + c_off[None, :], mask=v2, other=0.0), F64)
        n_t = tl.sum(_ct(v2, F64), axis=0)
        # the tile's shift k: its largest counted value (0 for an empty tile); x − k is small, so its sum is exact
        k_t = tl.where(n_t > 0, tl.max(tl.where(v2, x, -3.0e38), axis=0), 0.0)
        xs = tl.where(v2, x - k_t[None, :], 0.0)
        r_t = tl.sum(xs, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(v2, xs - r_t[None, :], 0.0)
        acc_n, acc_k, acc_r, acc_m2 = _chan(acc_n, acc_k, acc_r, acc_m2, n_t, k_t, r_t, tl.sum(d * d, axis=0))
    base = (g * S + pid_s) * C + cs
    plane = G * S * C
    tl.store(part_ptr + base, acc_n, mask=cmask)
    tl.store(part_ptr + plane + base, acc_k, mask=cmask)
    tl.store(part_ptr + 2 * plane + base, acc_r, mask=cmask)
    tl.store(part_ptr + 3 * plane + base, acc_m2, mask=cmask)
    if PACK:
        if (pid_s == 0) & (tl.program_id(1) == 0) & (g == 0):
            _pack_headers(msg_ptr, back_ptr, C, G, number, call, dtype_code, positions)
        if _last_of_block(lock_ptr, S * G):
            for gg in range(0, G):
                _pack_stats(part_ptr, msg_ptr, gg, C, G, S, cs, cmask, F64, BLOCK_C)


@_kernel
def finalize(
    part_ptr, stats_ptr, aux_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, nbt_ptr, finite_ptr, rmax_ptr, dmax_ptr,
    C, G, S, eps: tl.float64, momentum: tl.float64, r_max: tl.float64, d_max: tl.float64, warmup: tl.float64,
    has_w, has_b, clamp, has_nbt,
    TRAIN: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr, RENORM: tl.constexpr,
    LIMITS_PTR: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr,
    rec_ptr=None, sticky=0, check_few=0, GATHERED: tl.constexpr = False,
):
    """One program. ``TRAIN=False``: ``stats = (count, mean, m2)`` ``(3, G, C)`` (the reduce primitive).

    ``TRAIN=True``: ``stats = (count, mean, biased var)``; ``aux = (1/σ, scale, shift, new mean, new var)``
    ``(5, G, C)`` (the new values use row 0 only), and with ``RENORM`` four more rows ``(r, d, kz = γ'·r,
    bz = β + γ'·d)`` for the backward; with ``UPDATE`` the running buffers move toward the batch only
    when every new value is finite and every count exceeds 1; ``num_batches_tracked += finite``; ``finite`` stored.
    ``RENORM`` with float limits and ``warmup > 0`` ramps them by ``t = num_batches_tracked`` before this step
    (``BatchRenorm``'s warm-up): ``r_max(t) = 1 + (r_max − 1)·min(t/warmup, 1)``, ``d_max(t) = d_max·min(t/warmup, 1)``.

    ``GATHERED`` (SyncBatchNorm; keyword-only, so the other calls keep their specializations): ``part_ptr`` is the
    ``(S, 2·G·C + G + 6)`` table of the ``S`` ranks' messages ``[mean, m2, count, header]``, merged (Chan, float64) in
    place of the splits, after :func:`_sync_fault` checked the headers and the global count (``check_few``) and wrote
    the fault record to ``rec_ptr`` (``sticky``: keep a fault already there); a faulty step adds NaN to the mean and
    m2, so the guard refuses it.
    """
    if RENORM:
        if not LIMITS_PTR:  # the warm-up ramp in float64, from the count before this step's update
            t = tl.load(nbt_ptr, mask=has_nbt != 0, other=0).to(tl.float64)
            frac = tl.minimum(t / tl.maximum(warmup, 1.0), 1.0)
            r_max = tl.where(warmup > 0, 1.0 + (r_max - 1.0) * frac, r_max)
            d_max = tl.where(warmup > 0, d_max * frac, d_max)
    eps = _ct(eps, F64)
    momentum = _ct(momentum, F64)
    r_max = _ct(r_max, F64)
    d_max = _ct(d_max, F64)
    plane = G * C
    if GATHERED:
        poison = _sync_fault(part_ptr, rec_ptr, S, G, C, sticky, check_few)
    ok_finite = tl.full([BLOCK_C], 1, tl.int32)
    ok_enough = tl.full([BLOCK_C], 1, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        if TRAIN:
            w = _clamped(_opt(w_ptr, 0, cs, 0, 1, cmask, has_w, 1.0, F64), eps, clamp)
            b = _opt(b_ptr, 0, cs, 0, 1, cmask, has_b, 0.0, F64)
            if RENORM:
                rm0 = _feature(rm_ptr, 0, cs, 0, 1, cmask, F64)
                sigma = tl.sqrt(_feature(rv_ptr, 0, cs, 0, 1, cmask, F64) + eps)
                if LIMITS_PTR:
                    rmx = _ct(tl.load(rmax_ptr), F64)
                    dmx = _ct(tl.load(dmax_ptr), F64)
                else:
                    rmx = r_max
                    dmx = d_max
        sum_mean = _ct(tl.zeros([BLOCK_C], tl.float32), F64)
        sum_var = sum_mean
        for g in range(0, G):
            if GATHERED:  # the "splits" are the S ranks' messages (SyncBatchNorm), merged in float64
                n, mean, m2 = _ranks(part_ptr, g, G, S, C, cs, cmask, poison, F64, BLOCK_C)
            else:
                n, k, r, m2 = _splits(part_ptr, g, G, S, C, cs, cmask, F64, BLOCK_C)
                mean = k + r
            out = g * C + cs
            tl.store(stats_ptr + out, n, mask=cmask)
            tl.store(stats_ptr + plane + out, mean, mask=cmask)
            if TRAIN:
                var = m2 / tl.maximum(n, 1.0)
                tl.store(stats_ptr + 2 * plane + out, var, mask=cmask)
                invstd = 1.0 / tl.sqrt(var + eps)
                kz = w
                bz = b
                if RENORM:
                    rr = tl.sqrt(var + eps) / sigma
                    rr = tl.minimum(tl.maximum(rr, 1.0 / rmx), rmx)
                    dd = (mean - rm0) / sigma
                    dd = tl.minimum(tl.maximum(dd, -dmx), dmx)
                    kz = w * rr
                    bz = b + w * dd
                    tl.store(aux_ptr + 5 * plane + out, rr, mask=cmask)
                    tl.store(aux_ptr + 6 * plane + out, dd, mask=cmask)
                    tl.store(aux_ptr + 7 * plane + out, kz, mask=cmask)
                    tl.store(aux_ptr + 8 * plane + out, bz, mask=cmask)
                scale = kz * invstd
                tl.store(aux_ptr + out, invstd, mask=cmask)
                tl.store(aux_ptr + plane + out, scale, mask=cmask)
                tl.store(aux_ptr + 2 * plane + out, bz - mean * scale, mask=cmask)
                sum_mean += mean
                sum_var += var * n / tl.maximum(n - 1.0, 1.0)
                ok_enough = ok_enough & tl.where(cmask & (n <= 1.0), 0, 1)
            else:
                tl.store(stats_ptr + 2 * plane + out, m2, mask=cmask)
        if TRAIN:
            new_mean = sum_mean / G
            new_var = sum_var / G
            fin = ((new_mean - new_mean) == 0) & ((new_var - new_var) == 0)  # False for NaN and ±Inf
            ok_finite = ok_finite & tl.where(cmask & ~fin, 0, 1)
            tl.store(aux_ptr + 3 * plane + cs, new_mean, mask=cmask)
            tl.store(aux_ptr + 4 * plane + cs, new_var, mask=cmask)
    if UPDATE:
        tl.debug_barrier()  # the new values above are read back below (the same program)
        finite = tl.min(ok_finite, axis=0)
        ok = (finite & tl.min(ok_enough, axis=0)) != 0
        nbt = tl.load(nbt_ptr, mask=has_nbt != 0, other=0) + finite.to(tl.int64)
        tl.store(nbt_ptr, nbt, mask=has_nbt != 0)
        if CUMULATIVE:
            f = 1.0 / tl.maximum(_ct(nbt, F64), 1.0)
        else:
            f = momentum
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < C
            new_mean = _feature(aux_ptr + 3 * plane, 0, cs, 0, 1, cmask, F64)
            new_var = _feature(aux_ptr + 4 * plane, 0, cs, 0, 1, cmask, F64)
            rm = _feature(rm_ptr, 0, cs, 0, 1, cmask, F64)
            rv = _feature(rv_ptr, 0, cs, 0, 1, cmask, F64)
            rm = tl.where(ok, rm + f * (new_mean - rm), rm)
            rv = tl.where(ok, rv + f * (new_var - rv), rv)
            tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
            tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)
        tl.store(finite_ptr, finite != 0)


@triton.jit
def _last_of_block(lock_ptr, programs):
    """True in the last of the ``programs`` programs of feature block ``program_id(1)`` to get here: a CTA barrier,
    then one ``acq_rel`` atomic increment of the block's lock word (the "last block" pattern: every other program's
    stores are visible to the one that returns True). That program sets the word back to 0 (every program of the
    block has counted), ready for the next launch on the stream."""
    tl.debug_barrier()  # every thread's stores of this program are ordered before its release below
    word = lock_ptr + tl.program_id(1)
    seen = tl.atomic_add(word, 1, sem="acq_rel")
    tl.debug_barrier()
    last = seen == programs - 1
    tl.store(word, 0, mask=last)
    return last


@triton.jit
def _pack_stats(part_ptr, msg_ptr, g, C, G, S, cs, cmask, F64: tl.constexpr, BLOCK_C: tl.constexpr):
    """SyncBatchNorm: group ``g`` of this rank's message ``[mean (G·C), m2 (G·C), count (G), header (6)]`` for the
    features ``cs``, from the split partials (the Chan merge of :func:`finalize`)."""
    gc = G * C
    n, k, r, m2 = _splits(part_ptr, g, G, S, C, cs, cmask, F64, BLOCK_C)
    tl.store(msg_ptr + g * C + cs, (k + r).to(msg_ptr.dtype.element_ty), mask=cmask)
    tl.store(msg_ptr + gc + g * C + cs, m2.to(msg_ptr.dtype.element_ty), mask=cmask)
    # the count is the same for every feature (a mask has no feature axis): feature 0's
    tl.store(msg_ptr + 2 * gc + g + cs * 0, n.to(msg_ptr.dtype.element_ty), mask=cmask & (cs == 0))


@triton.jit
def _pack_headers(msg_ptr, back_ptr, C, G, number, call, dtype_code, positions):
    """SyncBatchNorm: the header ``(1, number, call, G·C, dtype_code, positions)`` of this rank's forward message,
    and the tail ``[0 (G), (2, number, call, G·C, dtype_code, 0)]`` of its backward message, whose
    ``(Σ dz, Σ dz·x̂)`` the backward writes in front of it (:func:`backward_partial` with ``FIN``)."""
    gc = G * C
    j = tl.arange(0, 8)
    for g0 in range(0, G, 8):
        tl.store(back_ptr + 2 * gc + g0 + j, tl.zeros([8], tl.float64).to(back_ptr.dtype.element_ty), mask=g0 + j < G)
    head = tl.where(j == 1, number.to(tl.float64), tl.zeros([8], tl.float64))
    head = tl.where(j == 2, call.to(tl.float64), head)
    head = tl.where(j == 3, gc.to(tl.float64), head)
    head = tl.where(j == 4, dtype_code.to(tl.float64), head)
    fwd = tl.where(j == 0, 1.0, tl.where(j == 5, positions.to(tl.float64), head))
    tl.store(msg_ptr + 2 * gc + G + j, fwd.to(msg_ptr.dtype.element_ty), mask=j < 6)
    tl.store(back_ptr + 2 * gc + G + j, tl.where(j == 0, 2.0, head).to(back_ptr.dtype.element_ty), mask=j < 6)


@_kernel
def sync_sums(
    tab_ptr, k_ptr, cnt_ptr, rec_ptr,
    C, G, W, scg, scc, sticky,
    BLOCK_C: tl.constexpr,
):
    """One program (SyncBatchNorm's backward combine): the ``W`` gathered messages ``[Σ dz, Σ dz·x̂, 0, header]``
    summed over ranks (float64), their headers checked (:func:`_sync_fault`, fault record to ``rec_ptr``), and
    ``mean(dz) = (Σ_r Σ dz + poison)/n``, ``mean(dz·x̂)`` likewise (``n`` the global count) written to rows 1 and 2 of
    ``k_ptr`` ``(3, G, C)``, where :func:`backward_apply` reads them."""
    poison = _sync_fault(tab_ptr, rec_ptr, W, G, C, sticky, 0)
    row_len = 2 * G * C + G + 6
    plane = G * C
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        for g in range(0, G):
            s_dz = tl.zeros([BLOCK_C], tl.float64)
            s_dzx = s_dz
            for w in range(0, W):
                row = tab_ptr + w * row_len + g * C + cs
                s_dz += tl.load(row, mask=cmask, other=0.0).to(tl.float64)
                s_dzx += tl.load(row + plane, mask=cmask, other=0.0).to(tl.float64)
            n = tl.maximum(_feature(cnt_ptr, g, cs, scg, scc, cmask, True), 1.0)
            out = g * C + cs
            tl.store(k_ptr + plane + out, ((s_dz + poison) / n).to(k_ptr.dtype.element_ty), mask=cmask)
            tl.store(k_ptr + 2 * plane + out, ((s_dzx + poison) / n).to(k_ptr.dtype.element_ty), mask=cmask)


@_kernel
def apply(
    x_ptr, y_ptr, a_ptr, b_ptr, w_ptr, bias_ptr,
    NO, C, NI, sxo, sxc, sxi, syo, syc, syi, sag, sac, sbg, sbc, R, eps: tl.float64, slope: tl.float64, act, has_w, has_b,
    FUSED_ACT: tl.constexpr, EVAL: tl.constexpr, GROUPED: tl.constexpr, F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``y = act(x · a + b)``; ``EVAL``: ``a = γ / sqrt(rv + eps)``, ``b = β − rm · a`` with ``a_ptr, b_ptr`` = rv, rm."""
    eps = _ct(eps, F64)
    slope = _ct(slope, F64)
    cs, pmask, cmask, v2, o, i, c64 = _tile(NO, C, NI, BLOCK_P, BLOCK_C)
    x = _ct(tl.load(x_ptr + (o * sxo + i * sxi)[:, None] + (c64 * sxc)[None, :], mask=v2, other=0.0), F64)
    if EVAL:
        a = 1.0 / tl.sqrt(_feature(a_ptr, 0, cs, 0, sac, cmask, F64) + eps)
        a = a * _opt(w_ptr, 0, cs, 0, 1, cmask, has_w, 1.0, F64)
        b = _opt(bias_ptr, 0, cs, 0, 1, cmask, has_b, 0.0, F64) - _feature(b_ptr, 0, cs, 0, sbc, cmask, F64) * a
        z = x * a[None, :] + b[None, :]
    elif GROUPED:
        g = o // R
        z = x * _feature2(a_ptr, g, cs, sag, sac, v2, F64) + _feature2(b_ptr, g, cs, sbg, sbc, v2, F64)
    else:
        z = x * _feature(a_ptr, 0, cs, 0, sac, cmask, F64)[None, :] + _feature(b_ptr, 0, cs, 0, sbc, cmask, F64)[None, :]
    if FUSED_ACT:
        z = _act(z, act, slope)
    tl.store(y_ptr + (o * syo + i * syi)[:, None] + (c64 * syc)[None, :], z.to(y_ptr.dtype.element_ty), mask=v2)


@triton.jit
def _dz_xhat(dy, t, p, q, zs, zb, act, slope, SAVE: tl.constexpr, FUSED_ACT: tl.constexpr):
    """``(dz, x̂)`` of ``torch_ops._dz_xhat``: ``SAVE`` recovers ``z = act⁻¹(y)`` from the output (leaky_relu: code 2)."""
    if SAVE:
        if FUSED_ACT:
            neg = ~(t > 0) & (act == 2)
            t = tl.where(neg, t / slope, t)
            dy = tl.where(neg, dy * slope, dy)
        xhat = (t - p) * q
        dz = dy
    else:
        xhat = (t - p) * q
        if FUSED_ACT:
            dz = dy * _dact(xhat * zs + zb, act, slope)
        else:
            dz = dy
    return dz, xhat


@triton.jit
def _params(p_ptr, q_ptr, zs_ptr, zb_ptr, g, cs, spg, spc, sqg, sqc, szsg, szsc, szbg, szbc, cmask, eps,
            has_zs, has_zb, clamp, PQ_WB: tl.constexpr, F64: tl.constexpr):
    """The per-feature ``p, q, zscale, zshift`` of group ``g`` as ``[BLOCK_C]`` vectors.

    ``PQ_WB`` (memory="save", fused): ``p = zshift``, ``q = 1 / clamp(zscale)`` are formed here from γ, β.
    """
    zs = _clamped(_opt(zs_ptr, g, cs, szsg, szsc, cmask, has_zs, 1.0, F64), eps, clamp)
    zb = _opt(zb_ptr, g, cs, szbg, szbc, cmask, has_zb, 0.0, F64)
    if PQ_WB:
        p = zb
        q = 1.0 / zs
    else:
        p = _feature(p_ptr, g, cs, spg, spc, cmask, F64)
        q = _feature(q_ptr, g, cs, sqg, sqc, cmask, F64)
    return p, q, zs, zb


@_kernel
def backward_partial(
    dy_ptr, t_ptr, part_ptr, p_ptr, q_ptr, zs_ptr, zb_ptr,
    NO, C, NI, sdo, sdc, sdi, sto, stc, sti, spg, spc, sqg, sqc, szsg, szsc, szbg, szbc, R, G, S, TILES,
    eps: tl.float64, slope: tl.float64,
    act, has_zs, has_zb, clamp,
    SAVE: tl.constexpr, FUSED_ACT: tl.constexpr, PQ_WB: tl.constexpr, F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    sums_ptr=None, k_ptr=None, cnt_ptr=None, invstd_ptr=None, w_ptr=None, rd_ptr=None, dw_ptr=None, db_ptr=None,
    lock_ptr=None, scg=0, scc=0, has_w=0, w_clamp=0, want_dw=0, want_db=0, FIN: tl.constexpr = False,
    RENORM: tl.constexpr = False,
):
    """``part[(Σ dz, Σ dz·x̂), g, split, c]`` over all positions of this program's tiles (masked ones too).

    ``FIN`` (SyncBatchNorm's backward; keyword-only): the last program of each feature block to finish
    (:func:`_last_of_block`) runs the fused :func:`backward_finalize` for the block's features (the sums into the
    backward message, the local ``k``, ``dγ``, ``dβ``): the partials and the finalize in one launch."""
    eps = _ct(eps, F64)
    slope = _ct(slope, F64)
    pid_s = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    g = tl.program_id(2)
    cmask = cs < C
    p, q, zs, zb = _params(p_ptr, q_ptr, zs_ptr, zb_ptr, g, cs, spg, spc, sqg, sqc, szsg, szsc, szbg, szbc, cmask,
                           eps, has_zs, has_zb, clamp, PQ_WB, F64)
    o0 = g * R
    npos = tl.minimum(R, NO - o0) * NI
    acc_dz = _ct(tl.zeros([BLOCK_C], dtype=tl.float32), F64)
    acc_dzx = acc_dz
    c64 = cs.to(tl.int64)
    tl.assume(TILES > 0)  # the host never launches 0 tiles: no zero-trip guard kept live to the end (FIN)
    for t in range(0, TILES):
        pos = (pid_s * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        v2 = (pos < npos)[:, None] & cmask[None, :]
        o = (o0 + pos // NI).to(tl.int64)
        i = (pos % NI).to(tl.int64)
        dy = _ct(tl.load(dy_ptr + (o * sdo + i * sdi)[:, None] + (c64 * sdc)[None, :], mask=v2, other=0.0), F64)
        tv = _ct(tl.load(t_ptr + (o * sto + i * sti)[:, None] + (c64 * stc)[None, :], mask=v2, other=0.0), F64)
        dz, xhat = _dz_xhat(dy, tv, p[None, :], q[None, :], zs[None, :], zb[None, :], act, slope, SAVE, FUSED_ACT)
        dz = tl.where(v2, dz, 0.0)
        acc_dz += tl.sum(dz, axis=0)
        acc_dzx += tl.sum(tl.where(v2, dz * xhat, 0.0), axis=0)
    base = (g * S + pid_s) * C + cs
    tl.store(part_ptr + base, acc_dz, mask=cmask)
    tl.store(part_ptr + G * S * C + base, acc_dzx, mask=cmask)
    if FIN:
        if _last_of_block(lock_ptr, S * G):
            # w_clamp: the finalize's own γ clamp flag (backward_finalize's clamp), a separate operand from the
            # partials' clamp, so no predicate of the kernel's start stays live to here (it spilled at sm_90)
            _backward_fin(part_ptr, sums_ptr, k_ptr, cnt_ptr, invstd_ptr, w_ptr, rd_ptr, dw_ptr, db_ptr, C, G, S,
                          scg, scc, eps, has_w, w_clamp, want_dw, want_db, cs, cmask, True, RENORM, F64, BLOCK_C)


@triton.jit
def _backward_fin(part_ptr, sums_ptr, k_ptr, cnt_ptr, invstd_ptr, w_ptr, rd_ptr, dw_ptr, db_ptr, C, G, S, scg, scc,
                  eps, has_w, clamp, want_dw, want_db, cs, cmask,
                  FUSED: tl.constexpr, RENORM: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr):
    """The backward finalize of the features ``cs`` (``eps`` already in the compute dtype): see
    :func:`backward_finalize`."""
    plane = G * C
    if FUSED:
        w = _clamped(_opt(w_ptr, 0, cs, 0, 1, cmask, has_w, 1.0, F64), eps, clamp)
    dw = _ct(tl.zeros([BLOCK_C], tl.float32), F64)
    db = dw
    for g in range(0, G):
        s_dz = _ct(tl.zeros([BLOCK_C], tl.float32), F64)
        s_dzx = s_dz
        for s in range(0, S):
            idx = (g * S + s) * C + cs
            s_dz += _ct(tl.load(part_ptr + idx, mask=cmask, other=0.0), F64)
            s_dzx += _ct(tl.load(part_ptr + G * S * C + idx, mask=cmask, other=0.0), F64)
        out = g * C + cs
        tl.store(sums_ptr + out, s_dz, mask=cmask)
        tl.store(sums_ptr + plane + out, s_dzx, mask=cmask)
        if FUSED:
            n = tl.maximum(_feature(cnt_ptr, g, cs, scg, scc, cmask, F64), 1.0)
            kz = w
            if RENORM:
                r = _feature(rd_ptr, g, cs, C, 1, cmask, F64)
                d = _feature(rd_ptr + plane, g, cs, C, 1, cmask, F64)
                kz = w * r
                dw += s_dzx * r + d * s_dz
            else:
                dw += s_dzx
            db += s_dz
            tl.store(k_ptr + out, kz * _feature(invstd_ptr, g, cs, C, 1, cmask, F64), mask=cmask)
            tl.store(k_ptr + plane + out, s_dz / n, mask=cmask)
            tl.store(k_ptr + 2 * plane + out, s_dzx / n, mask=cmask)
    if FUSED:
        tl.store(dw_ptr + cs, dw.to(dw_ptr.dtype.element_ty), mask=cmask & (want_dw != 0))
        tl.store(db_ptr + cs, db.to(db_ptr.dtype.element_ty), mask=cmask & (want_db != 0))


@_kernel
def backward_finalize(
    part_ptr, sums_ptr, k_ptr, cnt_ptr, invstd_ptr, w_ptr, rd_ptr, dw_ptr, db_ptr,
    C, G, S, scg, scc, eps: tl.float64, has_w, clamp, want_dw, want_db,
    FUSED: tl.constexpr, RENORM: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``sums = (Σ dz, Σ dz·x̂)`` ``(2, G, C)`` from the split partials; ``FUSED`` also writes
    ``k = γ'·r·(1/σ)``, ``mean(dz)``, ``mean(dz·x̂)`` into ``k_ptr`` ``(3, G, C)`` and ``dγ = Σ_g (Σdz·x̂·r + d·Σdz)``,
    ``dβ = Σ_g Σdz``."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _backward_fin(part_ptr, sums_ptr, k_ptr, cnt_ptr, invstd_ptr, w_ptr, rd_ptr, dw_ptr, db_ptr, C, G, S, scg, scc,
                  _ct(eps, F64), has_w, clamp, want_dw, want_db, cs, cs < C, FUSED, RENORM, F64, BLOCK_C)


@_kernel
def backward_apply(
    dy_ptr, t_ptr, m_ptr, dx_ptr, p_ptr, q_ptr, zs_ptr, zb_ptr, k_ptr, mdz_ptr, mdzx_ptr,
    NO, C, NI, sdo, sdc, sdi, sto, stc, sti, smo, smi, sxo, sxc, sxi,
    spg, spc, sqg, sqc, szsg, szsc, szbg, szbc, skg, skc, smg, smc, sng, snc, R, eps: tl.float64, slope: tl.float64,
    act, has_zs, has_zb, clamp, has_mask,
    SAVE: tl.constexpr, FUSED_ACT: tl.constexpr, PQ_WB: tl.constexpr, GROUPED: tl.constexpr, F64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx = k · (dz − m · (mean(dz) + x̂ · mean(dz·x̂)))`` in the dtype of ``t``."""
    eps = _ct(eps, F64)
    slope = _ct(slope, F64)
    cs, pmask, cmask, v2, o, i, c64 = _tile(NO, C, NI, BLOCK_P, BLOCK_C)
    dy = _ct(tl.load(dy_ptr + (o * sdo + i * sdi)[:, None] + (c64 * sdc)[None, :], mask=v2, other=0.0), F64)
    tv = _ct(tl.load(t_ptr + (o * sto + i * sti)[:, None] + (c64 * stc)[None, :], mask=v2, other=0.0), F64)
    if GROUPED:
        g = o // R
        zs = _clamped(_opt2(zs_ptr, g, cs, szsg, szsc, v2, has_zs, 1.0, F64), eps, clamp)
        zb = _opt2(zb_ptr, g, cs, szbg, szbc, v2, has_zb, 0.0, F64)
        if PQ_WB:
            p = zb
            q = 1.0 / zs
        else:
            p = _feature2(p_ptr, g, cs, spg, spc, v2, F64)
            q = _feature2(q_ptr, g, cs, sqg, sqc, v2, F64)
        k = _feature2(k_ptr, g, cs, skg, skc, v2, F64)
        mdz = _feature2(mdz_ptr, g, cs, smg, smc, v2, F64)
        mdzx = _feature2(mdzx_ptr, g, cs, sng, snc, v2, F64)
    else:
        p1, q1, zs1, zb1 = _params(p_ptr, q_ptr, zs_ptr, zb_ptr, 0, cs, spg, spc, sqg, sqc, szsg, szsc, szbg, szbc,
                                   cmask, eps, has_zs, has_zb, clamp, PQ_WB, F64)
        p = p1[None, :]
        q = q1[None, :]
        zs = zs1[None, :]
        zb = zb1[None, :]
        k = _feature(k_ptr, 0, cs, skg, skc, cmask, F64)[None, :]
        mdz = _feature(mdz_ptr, 0, cs, smg, smc, cmask, F64)[None, :]
        mdzx = _feature(mdzx_ptr, 0, cs, sng, snc, cmask, F64)[None, :]
    dz, xhat = _dz_xhat(dy, tv, p, q, zs, zb, act, slope, SAVE, FUSED_ACT)
    keep = tl.load(m_ptr + o * smo + i * smi, mask=pmask & (has_mask != 0), other=1) != 0
    corr = tl.where(keep[:, None], mdz + xhat * mdzx, 0.0)
    dx = k * (dz - corr)
    tl.store(dx_ptr + (o * sxo + i * sxi)[:, None] + (c64 * sxc)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=v2)


@_kernel
def update_running(
    mean_ptr, var_ptr, cnt_ptr, rm_ptr, rv_ptr, nbt_ptr, finite_ptr,
    C, G, smg, smc, svg, svc, scg, scc, momentum: tl.float64, has_nbt,
    CUMULATIVE: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The running update of ``functional.update_running`` from ``(G, C)`` statistics, in one program:
    ``μ = mean_g(mean)``, ``σ² = mean_g(var·n/(n−1))``; applied only if all finite and every count > 1."""
    momentum = _ct(momentum, F64)
    ok_finite = tl.full([BLOCK_C], 1, tl.int32)
    ok_enough = tl.full([BLOCK_C], 1, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        new_mean = _ct(tl.zeros([BLOCK_C], tl.float32), F64)
        new_var = new_mean
        for g in range(0, G):
            n = _feature(cnt_ptr, g, cs, scg, scc, cmask, F64)
            new_mean += _feature(mean_ptr, g, cs, smg, smc, cmask, F64)
            new_var += _feature(var_ptr, g, cs, svg, svc, cmask, F64) * n / tl.maximum(n - 1.0, 1.0)
            ok_enough = ok_enough & tl.where(cmask & (n <= 1.0), 0, 1)
        new_mean = new_mean / G
        new_var = new_var / G
        fin = ((new_mean - new_mean) == 0) & ((new_var - new_var) == 0)
        ok_finite = ok_finite & tl.where(cmask & ~fin, 0, 1)
    finite = tl.min(ok_finite, axis=0)
    ok = (finite & tl.min(ok_enough, axis=0)) != 0
    nbt = tl.load(nbt_ptr, mask=has_nbt != 0, other=0) + finite.to(tl.int64)
    tl.store(nbt_ptr, nbt, mask=has_nbt != 0)
    if CUMULATIVE:
        f = 1.0 / tl.maximum(_ct(nbt, F64), 1.0)
    else:
        f = momentum
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        new_mean = _ct(tl.zeros([BLOCK_C], tl.float32), F64)
        new_var = new_mean
        for g in range(0, G):
            n = _feature(cnt_ptr, g, cs, scg, scc, cmask, F64)
            new_mean += _feature(mean_ptr, g, cs, smg, smc, cmask, F64)
            new_var += _feature(var_ptr, g, cs, svg, svc, cmask, F64) * n / tl.maximum(n - 1.0, 1.0)
        new_mean = new_mean / G
        new_var = new_var / G
        rm = _feature(rm_ptr, 0, cs, 0, 1, cmask, F64)
        rv = _feature(rv_ptr, 0, cs, 0, 1, cmask, F64)
        rm = tl.where(ok, rm + f * (new_mean - rm), rm)
        rv = tl.where(ok, rv + f * (new_var - rv), rv)
        tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
        tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)
    tl.store(finite_ptr, finite != 0)


@triton.jit
def _saved_mean_var(mean_ptr, invstd_ptr, cs, cmask, eps):
    """One block of ATen's saved batch mean and the biased variance its ``1/σ`` implies, ``1/invstd² − eps``
    (float64)."""
    mean = tl.load(mean_ptr + cs, mask=cmask, other=0.0).to(tl.float64)
    inv = tl.load(invstd_ptr + cs, mask=cmask, other=1.0).to(tl.float64)
    return mean, 1.0 / (inv * inv) - eps


@_kernel
def update_from_invstd(
    mean_ptr, invstd_ptr, rm_ptr, rv_ptr, nbt_ptr, finite_ptr,
    C, n: tl.float64, eps: tl.float64, momentum: tl.float64, has_nbt,
    CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The guarded running update of a plain training step whose statistics ATen computed (cuDNN, MIOpen or ATen's
    own kernel, called without running buffers): its saved batch mean and ``1/σ``, ``n`` values per feature.

    ``σ²_B = 1/invstd² − eps`` (biased; float64 arithmetic on the saved float32 values), stored unbiased
    ``σ²_B · n/(n − 1)`` (clamped at 0); ``finite`` = every batch mean and variance finite (a NaN/Inf batch gives a
    NaN ``1/σ``, a variance that overflowed gives ``1/σ = 0``, i.e. an infinite variance);
    ``num_batches_tracked += finite``; the buffers move by ``running += f·(new − running)`` (``f = momentum`` or
    ``1/num_batches_tracked``) only if ``finite``. One program: the whole guard and update in one launch.
    """
    ok = tl.full([BLOCK_C], 1, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, var = _saved_mean_var(mean_ptr, invstd_ptr, cs, cmask, eps)
        fin = ((mean - mean) == 0) & ((var - var) == 0)  # False for NaN and ±Inf
        ok = ok & tl.where(cmask & ~fin, 0, 1)
    finite = tl.min(ok, axis=0)
    nbt = tl.load(nbt_ptr, mask=has_nbt != 0, other=0) + finite.to(tl.int64)
    tl.store(nbt_ptr, nbt, mask=has_nbt != 0)
    if CUMULATIVE:
        f = 1.0 / tl.maximum(nbt.to(tl.float64), 1.0)
    else:
        f = momentum
    keep = finite != 0
    unbias = n / tl.maximum(n - 1.0, 1.0)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        mean, var = _saved_mean_var(mean_ptr, invstd_ptr, cs, cmask, eps)
        var = tl.where(var > 0, var, 0.0) * unbias
        rm = tl.load(rm_ptr + cs, mask=cmask, other=0.0).to(tl.float64)
        rv = tl.load(rv_ptr + cs, mask=cmask, other=0.0).to(tl.float64)
        rm = tl.where(keep, rm + f * (mean - rm), rm)
        rv = tl.where(keep, rv + f * (var - rv), rv)
        tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
        tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)
    tl.store(finite_ptr, keep)
