"""Small models shared by the lab experiments, with a pluggable normalization layer.

Every model takes a ``norm`` argument: a name from :data:`NORMS` (``"bn"``, ``"affine"``, ``"none"``,
...) or a factory ``(num_features, axis) -> nn.Module``. The factory is called once per normalized
layer with the number of features and the feature axis of the tensor it will see (1 for ``(N, C)``
and ``(N, C, L)``, -1 for ``(N, L, C)`` sequences), so one experiment can swap BatchNorm for
AffineOnly, GroupNorm, LayerNorm, BatchRenorm or GhostBatchNorm without touching the model code.

Layout of every hidden block: ``Linear/Conv (bias only when the norm has no shift) → norm → act``,
the placement of Ioffe & Szegedy (2015, Section 3.2: normalize ``Wu``, drop the bias because β
replaces it).

Example::

    >>> from batchnorm.lab.models import MLP, CNN1d, SeqNet, make_norm
    >>> mlp = MLP(40, [64, 64], 10, norm="bn")
    >>> cnn = CNN1d(1, 10, width=16, depth=3, norm="groupnorm")
    >>> seq = SeqNet(1, 10, hidden=32, norm="bn")      # (N, L, C) input, BN with axis=-1
    >>> vgg = VGG(1, 10, norm="bn", init_seed=0)         # 6 conv layers, (N, 1, H, W) input
    >>> make_norm("ghost", 32, virtual_batch_size=8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..layers import AffineOnly, BatchNorm, BatchRenorm, GhostBatchNorm

NormFactory = Callable[[int, int], nn.Module]


class ChannelsLast(nn.Module):
    """Run a channels-first module (GroupNorm, ...) on ``(N, *, C)`` input by moving C to axis 1 and back.

    Shape: ``(N, *, C)`` → ``(N, *, C)``. Example: ``ChannelsLast(nn.GroupNorm(1, 8))(torch.randn(2, 5, 8))``.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.movedim(-1, 1)).movedim(1, -1)


def _groups(c: int, wanted: int) -> int:
    g = min(wanted, c)
    while c % g:
        g -= 1
    return g


def _channels_first(module: nn.Module, axis: int) -> nn.Module:
    return module if axis == 1 else ChannelsLast(module)


def _torch_bn(c: int, axis: int, **kw: Any) -> nn.Module:
    # torch's BN1d accepts (N, C) and (N, C, L); channels-last input is moved to axis 1
    return _channels_first(nn.BatchNorm1d(c, **kw), axis)


#: name → (builder(num_features, axis, **options), one-line description for tables)
NORMS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "bn": (lambda c, axis, **kw: BatchNorm(c, axis=axis, **kw), "BatchNorm: (x − μ_B)/σ_B, then γ·x̂ + β"),
    "bn-noaffine": (
        lambda c, axis, **kw: BatchNorm(c, axis=axis, affine=False, **kw),
        "BatchNorm without γ, β: (x − μ_B)/σ_B only",
    ),
    "affine": (lambda c, axis, **kw: AffineOnly(c, axis=axis, **kw), "AffineOnly: γ·x + β, no statistics"),
    "none": (lambda c, axis, **kw: nn.Identity(), "no normalization (linear layers keep their bias)"),
    "torch-bn": (_torch_bn, "torch.nn.BatchNorm1d (the reference implementation)"),
    "renorm": (lambda c, axis, **kw: BatchRenorm(c, axis=axis, **kw), "BatchRenorm (Ioffe 2017): r, d corrections"),
    "ghost": (
        lambda c, axis, virtual_batch_size=16, **kw: GhostBatchNorm(c, virtual_batch_size, axis=axis, **kw),
        "GhostBatchNorm (Hoffer et al. 2017): statistics per virtual batch",
    ),
    "groupnorm": (
        lambda c, axis, groups=8, **kw: _channels_first(nn.GroupNorm(_groups(c, groups), c, **kw), axis),
        "GroupNorm (Wu & He 2018): statistics per sample and channel group",
    ),
    "layernorm": (
        # GroupNorm with one group normalizes each sample over all its channels and positions:
        # LayerNorm over (C, *) for channels-first tensors, independent of the batch
        lambda c, axis, **kw: _channels_first(nn.GroupNorm(1, c, **kw), axis),
        "LayerNorm (Ba et al. 2016): statistics per sample over all features",
    ),
}

#: norms whose output has no learnable shift, so the preceding linear layer keeps its bias
_NEEDS_BIAS = {"none", "bn-noaffine"}


def make_norm(norm: str | NormFactory, num_features: int, axis: int = 1, **options: Any) -> nn.Module:
    """One normalization layer: ``norm`` is a :data:`NORMS` name or a factory ``(num_features, axis) -> module``.

    ``options`` go to the builder (e.g. ``momentum=0.1``, ``virtual_batch_size=8``, ``groups=4``).

    Shape: the module maps ``(N, C, *)`` (axis=1) or ``(N, *, C)`` (axis=-1) to the same shape.
    Example: ``make_norm("bn-noaffine", 64)`` is ``BatchNorm(64, affine=False)``.
    """
    if callable(norm):
        return norm(num_features, axis)
    if norm not in NORMS:
        raise ValueError(
            f"unknown norm {norm!r}: expected one of {sorted(NORMS)} or a callable (num_features, axis) -> module. "
            "Pass e.g. norm='bn' or norm=lambda c, axis: torch.nn.GroupNorm(4, c)."
        )
    return NORMS[norm][0](num_features, axis, **options)


def _needs_bias(norm: str | NormFactory) -> bool:
    return callable(norm) or norm in _NEEDS_BIAS


def _act(name: str) -> nn.Module:
    acts = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(acts)}.")
    return acts[name]()


class MLP(nn.Module):
    """Fully connected net: ``[Linear → norm → act] × len(hidden) → Linear``; input is flattened.

    Args:
        in_features: size of the flattened input.
        hidden: widths of the hidden layers (e.g. ``[128] * 8``).
        out_features: number of classes / outputs.
        norm: :data:`NORMS` name or factory; ``"none"`` keeps the linear biases.
        act: ``relu``, ``sigmoid``, ``tanh``, ``gelu`` or ``identity``.
        input_norm: optional norm applied to the raw input features (BN at the input).
        norm_options: passed to every hidden norm builder.

    ``self.blocks[i]`` is ``Sequential(linear, norm, act)`` so hooks can grab pre-/post-norm values.

    Shape: ``(N, *)`` with ``prod(*) = in_features`` → ``(N, out_features)``.
    Example: ``MLP(784, [100] * 3, 10, norm="bn", act="sigmoid")`` (Ioffe & Szegedy's Figure 1 net).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        out_features: int,
        *,
        norm: str | NormFactory = "bn",
        act: str = "relu",
        input_norm: str | NormFactory | None = None,
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        opts = dict(norm_options or {})
        self.input_norm = make_norm(input_norm, in_features) if input_norm is not None else nn.Identity()
        blocks = []
        width = in_features
        for h in hidden:
            blocks.append(
                nn.Sequential(
                    nn.Linear(width, h, bias=_needs_bias(norm)), make_norm(norm, h, 1, **opts), _act(act)
                )
            )
            width = h
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x.flatten(1))
        return self.head(self.blocks(x))


class CNN1d(nn.Module):
    """1-D conv net: ``[Conv1d(k) → norm → act] × depth`` (stride 2 from the second layer) → mean pool → Linear.

    Args:
        in_channels: input channels (1 for MNIST-1D).
        out_features: number of classes.
        width: channels of every conv layer.
        depth: number of conv layers.
        kernel_size: odd kernel size, "same" padding.
        norm, act, norm_options: as :class:`MLP`.

    Shape: ``(N, in_channels, L)`` → ``(N, out_features)``.
    Example: ``CNN1d(1, 10, width=32, depth=3, norm="bn")(torch.randn(8, 1, 40)).shape == (8, 10)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        *,
        width: int = 32,
        depth: int = 3,
        kernel_size: int = 5,
        norm: str | NormFactory = "bn",
        act: str = "relu",
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        opts = dict(norm_options or {})
        blocks = []
        c = in_channels
        for i in range(depth):
            conv = nn.Conv1d(
                c, width, kernel_size, stride=1 if i == 0 else 2, padding=kernel_size // 2, bias=_needs_bias(norm)
            )
            blocks.append(nn.Sequential(conv, make_norm(norm, width, 1, **opts), _act(act)))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=-1))


class VGG(nn.Module):
    """VGG-style 2-D ReLU conv net: stages of ``[Conv2d 3×3 → norm → act] × k`` with a 2×2 max-pool between
    stages, then a global mean pool and a Linear head (Simonyan & Zisserman 2015, at CPU scale).

    Args:
        in_channels: input channels (1 for MNIST digits).
        out_features: number of classes.
        stages: channels of every conv layer, one tuple per stage (default 6 conv layers: 8, 8 | 16, 16 | 16, 16).
        norm, act, norm_options: as :class:`MLP` (convs keep a bias only when the norm has no shift).
        init_seed: if given, every weight is drawn from a ``torch.Generator`` seeded with it: conv weights
            He-normal (std √(2/fan_in), for ReLU), head weights N(0, 1/fan_in), all biases zero. Two nets
            with the same ``init_seed`` then start from identical conv and head weights whatever their
            norm, so a with-BN / without-BN comparison is paired by initialization.

    ``self.convs`` lists the conv layers in forward order.

    Shape: ``(N, in_channels, H, W)`` with H, W divisible by ``2^(len(stages) − 1)`` → ``(N, out_features)``.
    Example: ``VGG(1, 10, norm="bn", init_seed=0)(torch.randn(8, 1, 16, 16)).shape == (8, 10)``.

    Reference: K. Simonyan and A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
    Recognition", ICLR 2015; the VGG nets of Santurkar et al. (2018) are of this form.
    """

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        *,
        stages: Sequence[Sequence[int]] = ((8, 8), (16, 16), (16, 16)),
        norm: str | NormFactory = "bn",
        act: str = "relu",
        norm_options: dict[str, Any] | None = None,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        if not stages or any(not stage for stage in stages):
            raise ValueError(f"VGG expected a non-empty list of non-empty stages of conv widths, got {stages!r}; "
                             "e.g. stages=((8, 8), (16, 16)).")
        opts = dict(norm_options or {})
        layers: list[nn.Module] = []
        c = in_channels
        for i, stage in enumerate(stages):
            if i:
                layers.append(nn.MaxPool2d(2))
            for width in stage:
                conv = nn.Conv2d(c, int(width), 3, padding=1, bias=_needs_bias(norm))
                layers += [conv, make_norm(norm, int(width), 1, **opts), _act(act)]
                c = int(width)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, out_features)
        if init_seed is not None:
            gen = torch.Generator().manual_seed(int(init_seed))
            with torch.no_grad():
                for mod in [*self.convs, self.head]:
                    fan_in = mod.weight[0].numel()
                    gain = 2.0 if isinstance(mod, nn.Conv2d) else 1.0
                    mod.weight.normal_(0.0, (gain / fan_in) ** 0.5, generator=gen)
                    if mod.bias is not None:
                        mod.bias.zero_()

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.features if isinstance(m, nn.Conv2d)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(-2, -1)))


class SeqNet(nn.Module):
    """Sequence model on ``(N, L, C)``: per-step ``Linear → norm(axis=-1) → act`` × depth (a depthwise
    temporal conv after the first block mixes neighbouring steps), masked mean over steps → Linear.

    The norm sees ``(N, L, H)`` tensors with the feature axis last, so a BatchNorm here averages
    each statistic over N·L values (every step of every sequence), and a ``mask`` ``(N, L)`` marks
    the real (unpadded) steps for the norms that accept one.

    Shape: ``(N, L, in_features)`` (or ``(N, in_features, L)`` with ``channels_first=True``) → ``(N, out_features)``.
    Example: ``SeqNet(1, 10, hidden=32, channels_first=True)(torch.randn(8, 1, 40)).shape == (8, 10)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: int = 32,
        depth: int = 2,
        norm: str | NormFactory = "bn",
        act: str = "relu",
        channels_first: bool = False,
        norm_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        opts = dict(norm_options or {})
        self.channels_first = channels_first
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.acts = nn.ModuleList()
        width = in_features
        for _ in range(depth):
            self.linears.append(nn.Linear(width, hidden, bias=_needs_bias(norm)))
            self.norms.append(make_norm(norm, hidden, -1, **opts))
            self.acts.append(_act(act))
            width = hidden
        self.mix = nn.Conv1d(hidden, hidden, 5, padding=2, groups=hidden)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_first:
            x = x.movedim(1, -1)
        for i, (lin, norm, act) in enumerate(zip(self.linears, self.norms, self.acts)):
            x = lin(x)
            x = norm(x, mask=mask) if mask is not None and isinstance(norm, (BatchNorm, AffineOnly)) else norm(x)
            x = act(x)
            if mask is not None:  # padded steps must not leak into real ones through the temporal mix
                x = x * mask.to(x.dtype).unsqueeze(-1)
            if i == 0:
                x = x + self.mix(x.movedim(-1, 1)).movedim(1, -1)
        if mask is None:
            pooled = x.mean(dim=1)
        else:
            m = mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(pooled)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every normalization layer of ``model`` in forward order (ours and torch's).

    Example: ``[n for n, _ in norm_layers(MLP(4, [8, 8], 2))] == ['blocks.0.1', 'blocks.1.1']``.
    """
    kinds = (BatchNorm, AffineOnly, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, ChannelsLast)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and not any(name.startswith(n + ".") for n, _ in out):
            out.append((name, mod))
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters. Example: ``count_parameters(nn.Linear(3, 2)) == 8``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
