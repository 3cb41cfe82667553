"""Standardizer: dataset-level z-scoring (scikit-learn's StandardScaler) that lives inside the model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .. import _checks
from .. import functional as bnf
from ..kernels import torch_ops as _t
from ..kernels.backend import Settings

_EPS64 = torch.finfo(torch.float64).eps


class Standardizer(nn.Module):
    r"""Per-feature ``y = (x − mean) / scale`` with statistics of a whole dataset, fitted once, saved with the model.

    Unlike :class:`BatchNorm` it never looks at the current batch: :meth:`partial_fit` accumulates
    the per-feature count, mean and sum of squared deviations ``m2`` of every chunk it sees (Chan,
    Golub & LeVeque merge, :func:`batchnorm.functional.merge_stats`, in float64, exact whatever the
    chunking), and :meth:`forward` applies the fixed map in training and evaluation alike::

        mean  = Σ x / n                 var = m2 / n            (biased, as scikit-learn)
        scale = sqrt(var + eps)         (1 for a constant feature, or with_std=False)
        y     = (x − mean) / scale      (mean = 0 with with_mean=False)

    A feature is *constant* when ``var ≤ n·ε·var + (n·mean·ε)²`` (ε = float64 machine epsilon: the
    error bound of the two-pass variance), scikit-learn's rule, so ``eps=0`` (default) reproduces
    ``sklearn.preprocessing.StandardScaler`` exactly. ``count, mean, m2`` are buffers (float64 by default) in the
    state dict, so a reloaded model keeps its scaling and can continue :meth:`partial_fit`. The
    output is computed in the centred form ``(x − mean) / scale`` in at least float32 (float64 for
    float64 input), with the float64 mean split into two terms of the compute dtype, so it stays
    accurate when ``|mean| ≫ std`` (e.g. float32 data around 1e6); gradients flow to ``x`` only.
    ``mask`` selects which positions count toward the statistics (padding); the statistics are
    never updated by :meth:`forward`.

    Args:
        num_features: C, the size of the feature axis.
        axis: the feature axis (1 for ``(N, C, *)``, -1 for ``(N, *, C)``); statistics pool every other axis.
        with_mean: subtract the mean (False: only divide by the scale, as scikit-learn).
        with_std: divide by the standard deviation (False: only centre).
        eps: added to the variance before the square root (0 = scikit-learn parity).
        device: of the buffers.
        dtype: of the buffers, float64 by default (recommended). Chunks are always reduced and merged
            in float64; the merged statistics are then stored in this dtype.

    Shape: input any rank ≥ 2 with C at ``axis``; output the same shape and dtype.

    Example::

        >>> from sklearn.datasets import load_wine
        >>> X = torch.as_tensor(load_wine().data, dtype=torch.float32)        # (178, 13)
        >>> model = torch.nn.Sequential(Standardizer(13).fit(X), torch.nn.Linear(13, 3))
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=50)
        >>> model[0].fit(loader, progress=False).mean.shape                 # same stats from chunks
        torch.Size([13])

    Reference: scikit-learn ``StandardScaler``; T. F. Chan, G. H. Golub and R. J. LeVeque,
    "Updating Formulae and a Pairwise Algorithm for Computing Sample Variances", 1979; LeCun et al.,
    "Efficient BackProp", 1998 (Section 4.3: centre and scale the inputs).
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    def __init__(
        self,
        num_features: int,
        *,
        axis: int = 1,
        with_mean: bool = True,
        with_std: bool = True,
        eps: float = 0.0,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = _checks.check_num_features(num_features, "Standardizer")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}.")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= float(eps) < float("inf"):
            raise ValueError(
                f"Standardizer expected eps to be a finite number >= 0, got {eps!r}. eps=0 matches scikit-learn's "
                "StandardScaler (constant features get scale 1 anyway)."
            )
        dtype = torch.float64 if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"Standardizer expected dtype to be a floating torch.dtype for its statistics buffers, got {dtype!r}. "
                "Leave it at None (float64, recommended: the statistics of a whole dataset need the digits)."
            )
        self.axis = axis
        self.with_mean = bool(with_mean)
        self.with_std = bool(with_std)
        self.eps = float(eps)
        for name in ("count", "mean", "m2"):
            self.register_buffer(name, torch.zeros(num_features, dtype=dtype, device=device))
        self.last_input_shape: tuple[int, ...] | None = None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, axis={self.axis}, with_mean={self.with_mean}, with_std={self.with_std}, "
            f"eps={self.eps}"
        )

    # -- fitting -------------------------------------------------------------------------------
    def reset(self) -> Standardizer:
        """Forget every statistic (count, mean and m2 back to 0); returns self."""
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()
        return self

    def _chunk_stats(
        self, x: torch.Tensor, mask: torch.Tensor | None, name: str, where: str = "a chunk"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 ``(count, mean, m2)`` of one chunk on the buffers' device; refuses non-finite values."""
        x, ax = _checks.layer_input(self, x, name)
        m = _checks.mask_for(x, ax, mask)
        xd = x.detach().to(device=self.mean.device, dtype=torch.float64)
        m = m.to(self.mean.device) if m is not None else None
        count, mean, m2 = _t.reduce(xd, Settings(ax), m)
        count, mean, m2 = count[0], mean[0], m2[0]
        bad = ~(torch.isfinite(mean) & torch.isfinite(m2))
        if bool(bad.any()):
            feats = bad.nonzero().flatten().tolist()
            shown = ", ".join(map(str, feats[:10])) + (", ..." if len(feats) > 10 else "")
            raise ValueError(
                f"{name} expected finite values, got NaN or Inf in feature(s) [{shown}] of {where} "
                f"of shape {tuple(x.shape)}; the statistics were left unchanged. Impute or drop those values first, "
                + ("or exclude their positions with mask=." if name.endswith("partial_fit") else
                   "or exclude their positions with a mask: partial_fit(chunk, mask=...) after reset().")
            )
        return count, mean, m2

    def _state64(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f64 = torch.float64
        return self.count.to(f64), self.mean.to(f64), self.m2.to(f64)

    def _commit(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        self.count.copy_(count)
        self.mean.copy_(mean)
        self.m2.copy_(m2)

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Standardizer:
        """Merge the statistics of one chunk into the running totals; returns self.

        ``n = n_a + n_b``, ``δ = μ_b − μ_a``, ``μ = μ_a + δ·n_b/n``, ``m2 = m2_a + m2_b + δ²·n_a·n_b/n``
        (float64). The chunk is reduced over every axis but ``axis``, only where ``mask`` is true.
        A chunk with NaN or Inf in counted positions is refused (nothing changes).

        Shape: x any rank ≥ 2 with C at ``axis``; mask: x's shape without ``axis``.
        Example: ``s = Standardizer(3).partial_fit(torch.randn(10, 3)).partial_fit(torch.randn(5, 3))``.
        """
        stats = self._chunk_stats(x, mask, "Standardizer.partial_fit")
        self._commit(*bnf.merge_stats(*self._state64(), *stats))
        return self

    @torch.no_grad()
    def fit(
        self,
        data: torch.Tensor | Iterable[Any],
        progress: bool = False,
        *,
        key: str | int | Callable[[Any], torch.Tensor] | None = None,
    ) -> Standardizer:
        """Fit on the whole of ``data`` from scratch; returns self. Atomic: all of ``data`` or nothing.

        Equivalent to ``reset()`` followed by :meth:`partial_fit` on every chunk, except that the
        statistics are accumulated in fresh state and committed only after the last chunk: if any
        chunk fails (non-finite values, wrong shape, an error raised by the loader itself, Ctrl-C),
        the layer keeps exactly the statistics it had before the call. An empty source (``fit([])``,
        an exhausted generator, chunks without a single counted value) is a ``ValueError`` that
        also leaves the layer unchanged.

        ``data``: one tensor, or any iterable of batches (e.g. a ``DataLoader``). How the input is
        taken from each batch:

        * ``key=None`` (default): the batch itself if it is a tensor, else the first element of a
          tuple/list (``(x, y)`` from a ``TensorDataset``); a dict batch needs ``key``;
        * ``key="x"`` (or an int index): ``batch[key]``, for dict batches (Hugging Face style
          ``{"x": ..., "label": ...}``) or to pick another tuple element;
        * ``key=callable``: ``key(batch)`` returns the input tensor.

        ``progress=True`` shows a tqdm bar.

        Shape: every input chunk has C at ``axis`` (any rank ≥ 2).

        Example::

            >>> from torch.utils.data import DataLoader, TensorDataset
            >>> x, y = torch.randn(100, 3), torch.zeros(100)
            >>> Standardizer(3).fit(DataLoader(TensorDataset(x, y), batch_size=32)).count[0]
            tensor(100., dtype=torch.float64)
            >>> Standardizer(3).fit([{"x": x, "y": y}], key="x").is_fitted
            True

        Reference: scikit-learn ``StandardScaler.fit`` (``fit`` = reset + ``partial_fit``).
        """
        if key is not None and not (callable(key) or isinstance(key, (str, int))):
            raise TypeError(
                f"Standardizer.fit expected key to be None, a str/int index into each batch or a callable batch -> "
                f"tensor, got {type(key).__name__}. Example: fit(loader, key='x') for dict batches."
            )
        if isinstance(data, torch.Tensor):
            if key is not None:
                raise TypeError(
                    "Standardizer.fit got a tensor and key=; key selects the input inside each batch of an iterable. "
                    "Pass the tensor alone: fit(x)."
                )
            chunks: Iterable[Any] = (data,)
        elif hasattr(data, "__array__") and not isinstance(data, (tuple, list)):
            raise TypeError(
                f"Standardizer.fit expected a torch.Tensor or an iterable of tensors / (x, y) tuples, got "
                f"{type(data).__name__}. Convert it with torch.as_tensor(data)."
            )
        elif not isinstance(data, Iterable):
            raise TypeError(
                f"Standardizer.fit expected a tensor or an iterable of tensors / (x, y) tuples (e.g. a DataLoader), "
                f"got {type(data).__name__}."
            )
        else:
            chunks = data
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="Standardizer.fit", unit="batch")
        dev = self.mean.device
        state = tuple(torch.zeros(self.num_features, dtype=torch.float64, device=dev) for _ in range(3))
        seen = 0
        try:
            for i, batch in enumerate(chunks):
                chunk = _select_input(batch, key, i)
                where = "the data" if isinstance(data, torch.Tensor) else f"batch {i}"
                state = bnf.merge_stats(*state, *self._chunk_stats(chunk, None, "Standardizer.fit", where))
                seen = i + 1
        except BaseException as exc:
            if hasattr(exc, "add_note"):  # Python >= 3.11: say what happened to the layer
                exc.add_note(
                    f"Standardizer.fit stopped after {seen} complete batch(es) and committed nothing: the layer keeps "
                    f"the statistics it had before this call ({self._describe_state()})."
                )
            raise
        if seen == 0 or not bool((state[0] > 0).any()):
            what = "no batches (an empty iterable, or an iterator/generator that was already exhausted)"
            if seen:
                what = f"{seen} batch(es) without a single counted value"
            raise ValueError(
                f"Standardizer.fit received {what}; the layer was left unchanged ({self._describe_state()}). "
                "Pass the training data (a tensor or a DataLoader); re-create a generator before fitting again."
            )
        self._commit(*state)
        return self

    def _describe_state(self) -> str:
        if not bool((self.count > 0).any()):
            return "not fitted"
        return f"fitted on {int(self.count.max())} value(s) per feature"

    # -- fitted statistics ---------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        """True once some value has been seen for every feature."""
        return bool((self.count > 0).all())

    @property
    def var(self) -> torch.Tensor:
        """Biased per-feature variance ``m2 / n`` (``(C,)``, the buffers' dtype)."""
        return self.m2 / self.count.clamp_min(1)

    @property
    def scale(self) -> torch.Tensor:
        """Per-feature divisor: ``sqrt(var + eps)``, 1 for constant features or with ``with_std=False`` (float64)."""
        if not self.with_std:
            return torch.ones_like(self.var, dtype=torch.float64)
        var, n, mean = self.var.double(), self.count.double(), self.mean.double()
        constant = var <= n * _EPS64 * var + (n * mean * _EPS64) ** 2
        return torch.where(constant, torch.ones_like(var), torch.sqrt(var + self.eps))

    def _map(self, x: torch.Tensor, name: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
        x, ax = _checks.layer_input(self, x, name)
        sd = _t.stat_dtype(x.dtype)
        # The map's constants are computed once per state of the buffers (their version counters move with every
        # in-place change: fit, partial_fit, reset, load_state_dict, a user's copy_): a forward then reads nothing
        # back from the device (no host sync on a GPU) and launches one kernel per term.
        bufs = (self.count, self.mean, self.m2)
        cacheable = not any(b.is_inference() for b in bufs)  # (inference tensors have no version counter)
        key = (tuple(b._version for b in bufs), x.device, sd, x.dim(), ax, self.with_mean, self.with_std,
               self.eps) if cacheable else None
        hit = self.__dict__.get("_map_cache")
        if cacheable and hit is not None and hit[1] == key and all(a is b for a, b in zip(hit[0], bufs)):
            return (ax, *hit[2], sd)
        if not self.is_fitted:
            raise ValueError(
                f"{name}: this Standardizer is not fitted yet (no values seen for some features). Call "
                ".fit(data) or .partial_fit(x) with training data first, or load a fitted state dict."
            )
        shape = [1] * x.dim()
        shape[ax] = -1
        mean = (self.mean if self.with_mean else torch.zeros_like(self.mean)).to(x.device)
        # the float64 mean as hi + lo in the compute dtype: x − hi is exact when x ≈ mean (Sterbenz),
        # so a float32 input with |mean| ≫ std keeps its digits (one rounded float32 mean would not)
        hi = mean.to(sd)
        lo = (mean - hi.to(mean.dtype)).to(sd)
        scale = self.scale.to(device=x.device, dtype=sd)
        consts = (hi.reshape(shape), lo.reshape(shape), scale.reshape(shape))
        if cacheable:
            self.__dict__["_map_cache"] = (bufs, key, consts)
        return (ax, *consts, sd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``y = (x − mean) / scale``; ``mask`` is validated for interface parity and changes nothing."""
        ax, hi, lo, scale, sd = self._map(x, "Standardizer")
        _checks.mask_for(x, ax, mask)
        self.last_input_shape = tuple(x.shape)
        return ((x.to(sd) - hi - lo) / scale).to(x.dtype)

    def inverse_transform(self, y: torch.Tensor) -> torch.Tensor:
        """``x = y · scale + mean``, the inverse of :meth:`forward` (e.g. to report predictions in data units)."""
        _, hi, lo, scale, sd = self._map(y, "Standardizer.inverse_transform")
        return (y.to(sd) * scale + lo + hi).to(y.dtype)


def select_input(batch: Any, key: Any, i: int, tool: str, *, entry: str, named: str, returns: str,
                 dict_hint: str) -> Any:
    """The input of batch ``i``: ``key(batch)``, ``batch[key]``, the batch itself, or element 0 of a tuple/list.

    Shared by :meth:`Standardizer.fit` and :func:`batchnorm.adapt`; the wording of the errors is the caller's:
    ``tool`` names it, ``entry`` is what a dict batch leaves unclear (``"the input"``), ``named`` what ``key`` names
    (``"the input tensor"``), ``returns`` what a callable key returns, ``dict_hint`` the advice for dict batches
    (``{example}`` is replaced by one of its keys). A dict without ``key``, or a ``key`` the batch does not have,
    raises TypeError; checking what comes back is the caller's.

    Shape: not applicable. Example: ``select_input((x, y), None, 0, "fit", ...)`` is ``x``.
    """
    if callable(key):
        return key(batch)
    if key is not None:
        try:
            return batch[key]
        except (KeyError, IndexError, TypeError) as exc:
            keys = f" (its keys: {list(batch)[:10]})" if isinstance(batch, dict) else ""
            raise TypeError(
                f"{tool} could not take key={key!r} from batch {i} of type {type(batch).__name__}{keys}: {exc!r}. "
                f"Pass the name/index of {named} in each batch, or key=callable(batch) -> {returns}."
            ) from None
    if isinstance(batch, dict):
        names = list(batch)[:10]
        example = next((k for k in names if isinstance(batch[k], torch.Tensor)), names[0] if names else "x")
        raise TypeError(f"{tool} got a dict batch (keys {names}) and cannot tell which entry is {entry}. "
                        + dict_hint.replace("{example}", repr(example)))
    if isinstance(batch, (tuple, list)) and len(batch) > 0:
        return batch[0]
    return batch


def _select_input(batch: Any, key: str | int | Callable[[Any], torch.Tensor] | None, i: int) -> torch.Tensor:
    """The input tensor of one batch of :meth:`Standardizer.fit` (rules in its docstring)."""
    chunk = select_input(
        batch, key, i, "Standardizer.fit", entry="the input", named="the input tensor", returns="tensor",
        dict_hint="Pass key={example} (the name of the input tensor), or key=lambda batch: batch[{example}], or a "
                  "DataLoader whose batches are tensors or (x, y) tuples (e.g. over a TensorDataset).")
    if not isinstance(chunk, torch.Tensor):
        if callable(key):
            got = f"key(batch {i}) returned {type(chunk).__name__}"
        elif key is not None:
            got = f"batch {i}[{key!r}] is {type(chunk).__name__}"
        elif isinstance(batch, (tuple, list)) and len(batch) > 0:
            got = f"item {i} of the data is a {type(batch).__name__} starting with {type(chunk).__name__}"
        else:
            got = f"item {i} of the data is {type(batch).__name__}"
        raise TypeError(
            f"Standardizer.fit expected item {i} of the data to be a tensor or a tuple/list starting with one, but "
            f"{got}. A DataLoader over a TensorDataset(x, y) yields [x, y] batches; for dict batches pass "
            "key='name'; key=callable(batch) -> tensor selects the input from anything else."
        )
    return chunk
