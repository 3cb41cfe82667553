"""Small, faithful re-implementations of the torchvision CNNs that batch norm is used in.

torchvision does not import beside the pinned torch on every machine, so the tests, benchmarks and
tools of this package use these instead. Each block follows the torchvision source structure and
*idioms* that matter to a normalization layer — where the BN sits, which activation follows it,
whether that activation is ``inplace=True``, in-place residual additions (``out += identity``),
concatenation (DenseNet), squeeze-and-excitation (EfficientNet) — with configurable, small widths
so a forward and backward take milliseconds. Weights are randomly initialized (as torchvision does
with ``weights=None``); nothing is downloaded.

Every constructor takes ``norm_layer`` (default ``torch.nn.BatchNorm2d``, as torchvision), a
callable ``norm_layer(num_features) -> nn.Module``; build with torch's BN and then
``batchnorm.convert(model)``, or pass ``batchnorm.BatchNorm2d`` directly.

Models (name → constructor, in :data:`MODELS`; :func:`example_input` gives a matching batch):

================== ===================================================== ============================
name               structure                                             paper
================== ===================================================== ============================
resnet18_cifar     3×3 stem, 4 stages × 2 :class:`BasicBlock`, fc         He et al. 2016
mobilenet_v2_tiny  stem, :class:`InvertedResidual` stages (ReLU6), head   Sandler et al. 2018
efficientnet_tiny  stem, :class:`MBConv` stages (SiLU, SE), head          Tan & Le 2019
densenet_tiny      stem, :class:`DenseBlock` + :class:`Transition`, head  Huang et al. 2017
================== ===================================================== ============================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "BasicBlock", "ConvNormActivation", "InvertedResidual", "SqueezeExcitation", "MBConv", "DenseLayer",
    "DenseBlock", "Transition", "ResNet", "MobileNetV2", "EfficientNet", "DenseNet", "resnet18_cifar",
    "mobilenet_v2_tiny", "efficientnet_tiny", "densenet_tiny", "MODELS", "BLOCKS", "example_input",
    "BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNorm2d", "FrozenBatchNormAct2d", "freeze_batch_norm_2d",
    "freeze", "convert_sync_batchnorm", "timm_block",
]

NormLayer = Callable[[int], nn.Module]


def _norm(norm_layer: NormLayer | None) -> NormLayer:
    return nn.BatchNorm2d if norm_layer is None else norm_layer


def _conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


# -- ResNet ---------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)``, as torchvision's.

    The first ReLU and the last one are the same ``nn.ReLU(inplace=True)`` module, applied in place to
    BN's output; the shortcut is added in place (``out += identity``). When the stride or width
    changes, ``downsample`` is ``conv1x1(stride) → BN``.

    Shape: ``(N, inplanes, H, W)`` → ``(N, planes, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Example::

        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])

    Reference: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016;
    torchvision.models.resnet.BasicBlock.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(_conv1x1(inplanes, planes, stride), norm(planes))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stride-1 stem (no max-pool), four stages of :class:`BasicBlock`, pooling, fc.

    Stage widths are ``width · (1, 2, 4, 8)`` with strides ``(1, 2, 2, 2)``; ``layers`` blocks per stage.
    Initialization as torchvision: Kaiming-normal convs, BN ``γ = 1, β = 0``.

    Shape: ``(N, 3, H, W)`` → ``(N, num_classes)``.

    Example::

        >>> net = ResNet((2, 2, 2, 2), num_classes=10, width=8)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])

    Reference: He et al., CVPR 2016 (Section 4.2, the CIFAR-10 variant of the stem).
    """

    def __init__(
        self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, width: int = 64,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        self.conv1 = _conv3x3(3, width)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = [BasicBlock(cin, planes, 1 if i == 0 else 2, norm)]
            blocks += [BasicBlock(planes, planes, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = planes
        if len(stages) != 4:
            raise ValueError(f"ResNet expected 4 stages (blocks per stage), got layers={layers!r}.")
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, width: int = 64, norm_layer: NormLayer | None = None) -> ResNet:
    """ResNet-18 for 32×32 inputs (20 BN layers at any width); ``width=64`` is the usual CIFAR ResNet-18.

    Shape: ``(N, 3, 32, 32)`` → ``(N, num_classes)``. Example: ``resnet18_cifar(width=8)(torch.randn(2, 3, 32, 32))``.
    Reference: He et al., CVPR 2016.
    """
    return ResNet((2, 2, 2, 2), num_classes, width, norm_layer)


# -- MobileNetV2 / EfficientNet building block ----------------------------------------------------
class ConvNormActivation(nn.Sequential):
    """``conv → norm → activation`` as a Sequential with children ``"0", "1", "2"`` (torchvision's Conv2dNormActivation).

    Padding ``(kernel_size − 1) // 2``, no conv bias; ``activation`` is a module class built with
    ``inplace=True`` when it accepts it (ReLU, ReLU6, SiLU), or None for no activation.

    Shape: ``(N, cin, H, W)`` → ``(N, cout, ⌈H/stride⌉, ⌈W/stride⌉)``.
    Example: ``ConvNormActivation(3, 8, stride=2, activation=nn.ReLU6)(torch.randn(1, 3, 8, 8))``.
    Reference: torchvision.ops.misc.Conv2dNormActivation.
    """

    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
        norm_layer: NormLayer | None = None, activation: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            _norm(norm_layer)(cout),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = cout


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1×1 expand (ReLU6) → 3×3 depthwise (ReLU6) → 1×1 linear project → BN.

    ``hidden = round(inp · expand_ratio)``; the expansion conv is skipped when ``expand_ratio == 1``.
    The residual ``x + conv(x)`` is used when ``stride == 1`` and ``inp == oup``. The ReLU6 modules are
    ``inplace=True`` on BN's output, as in torchvision.

    Shape: ``(N, inp, H, W)`` → ``(N, oup, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Example::

        >>> block = InvertedResidual(16, 16, stride=1, expand_ratio=6)
        >>> block.use_res_connect, block(torch.randn(2, 16, 8, 8)).shape
        (True, torch.Size([2, 16, 8, 8]))

    Reference: Sandler, Howard, Zhu, Zhmoginov & Chen, "MobileNetV2: Inverted Residuals and Linear
    Bottlenecks", CVPR 2018; torchvision.models.mobilenetv2.InvertedResidual.
    """

    def __init__(
        self, inp: int, oup: int, stride: int, expand_ratio: float, norm_layer: NormLayer | None = None
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual expected stride 1 or 2, got {stride}.")
        norm = _norm(norm_layer)
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden, 1, norm_layer=norm, activation=nn.ReLU6))
        layers += [
            ConvNormActivation(hidden, hidden, 3, stride, groups=hidden, norm_layer=norm, activation=nn.ReLU6),
            _conv1x1(hidden, oup),
            norm(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """A small MobileNetV2: stem (stride 2, ReLU6), :class:`InvertedResidual` stages, 1×1 head, classifier.

    ``setting`` rows are torchvision's ``[t, c, n, s]`` (expansion, output channels, repeats, first
    stride); the default is a shortened version of the paper's table with small widths.

    Shape: ``(N, 3, H, W)`` → ``(N, num_classes)``.

    Example::

        >>> net = MobileNetV2(num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])

    Reference: Sandler et al., CVPR 2018, Table 2; torchvision.models.MobileNetV2.
    """

    def __init__(
        self, num_classes: int = 10, stem: int = 8, last_channel: int = 64,
        setting: tuple[tuple[int, int, int, int], ...] = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2)),
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        features: list[nn.Module] = [ConvNormActivation(3, stem, 3, 2, norm_layer=norm, activation=nn.ReLU6)]
        cin = stem
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidual(cin, c, s if i == 0 else 1, t, norm))
                cin = c
        features.append(ConvNormActivation(cin, last_channel, 1, norm_layer=norm, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2_tiny(num_classes: int = 10, norm_layer: NormLayer | None = None) -> MobileNetV2:
    """A MobileNetV2 with widths 8..64 (5 inverted residuals, 2 with a residual connection).

    Shape: ``(N, 3, 32, 32)`` → ``(N, num_classes)``. Example: ``mobilenet_v2_tiny()(torch.randn(2, 3, 32, 32))``.
    Reference: Sandler et al., CVPR 2018.
    """
    return MobileNetV2(num_classes, norm_layer=norm_layer)


# -- EfficientNet ---------------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation: ``x · sigmoid(fc2(silu(fc1(avgpool(x)))))`` with 1×1 convs (torchvision's).

    Shape: ``(N, C, H, W)`` → same. Example: ``SqueezeExcitation(16, 4)(torch.randn(2, 16, 8, 8))``.
    Reference: Hu, Shen & Sun, "Squeeze-and-Excitation Networks", CVPR 2018; torchvision.ops.SqueezeExcitation.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """EfficientNet MBConv: 1×1 expand (SiLU) → k×k depthwise (SiLU) → squeeze-excite → 1×1 project → BN.

    The expansion is skipped when ``expand_ratio == 1``; squeeze channels ``max(1, inp // 4)``; the
    shortcut is added in place (``result += x``) when ``stride == 1`` and ``inp == oup``. Stochastic
    depth is off (identity), so the block is deterministic. SiLU modules are ``inplace=True``, as torchvision.

    Shape: ``(N, inp, H, W)`` → ``(N, oup, ⌈H/stride⌉, ⌈W/stride⌉)``.

    Example::

        >>> block = MBConv(16, 16, expand_ratio=4, kernel_size=3, stride=1)
        >>> block(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])

    Reference: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
    ICML 2019 (block from MobileNetV3/MnasNet); torchvision.models.efficientnet.MBConv.
    """

    def __init__(
        self, inp: int, oup: int, expand_ratio: float, kernel_size: int, stride: int,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        self.use_res_connect = stride == 1 and inp == oup
        hidden = int(round(inp * expand_ratio))
        layers: list[nn.Module] = []
        if hidden != inp:
            layers.append(ConvNormActivation(inp, hidden, 1, norm_layer=norm, activation=nn.SiLU))
        layers += [
            ConvNormActivation(hidden, hidden, kernel_size, stride, groups=hidden, norm_layer=norm, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, inp // 4)),
            ConvNormActivation(hidden, oup, 1, norm_layer=norm, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class EfficientNet(nn.Module):
    """A small EfficientNet: stem (stride 2, SiLU), :class:`MBConv` stages, 1×1 head (4× widest), classifier.

    ``setting`` rows: ``(expand_ratio, kernel, stride, in, out, repeats)`` as torchvision's ``MBConvConfig``.

    Shape: ``(N, 3, H, W)`` → ``(N, num_classes)``.

    Example::

        >>> net = EfficientNet(num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])

    Reference: Tan & Le, ICML 2019, Table 1; torchvision.models.EfficientNet.
    """

    def __init__(
        self, num_classes: int = 10,
        setting: tuple[tuple[float, int, int, int, int, int], ...] = (
            (1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 2, 12, 16, 2),
        ),
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        first = setting[0][3]
        features: list[nn.Module] = [ConvNormActivation(3, first, 3, 2, norm_layer=norm, activation=nn.SiLU)]
        for t, k, s, cin, cout, n in setting:
            features.append(nn.Sequential(*[
                MBConv(cin if i == 0 else cout, cout, t, k, s if i == 0 else 1, norm) for i in range(n)
            ]))
        last = setting[-1][4]
        features.append(ConvNormActivation(last, 4 * last, 1, norm_layer=norm, activation=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * last, num_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_tiny(num_classes: int = 10, norm_layer: NormLayer | None = None) -> EfficientNet:
    """An EfficientNet with widths 8..64 (5 MBConv blocks, 2 with a residual, all with squeeze-excite).

    Shape: ``(N, 3, 32, 32)`` → ``(N, num_classes)``. Example: ``efficientnet_tiny()(torch.randn(2, 3, 32, 32))``.
    Reference: Tan & Le, ICML 2019.
    """
    return EfficientNet(num_classes, norm_layer=norm_layer)


# -- DenseNet -------------------------------------------------------------------------------------
class DenseLayer(nn.Module):
    """DenseNet-BC layer: ``conv2(relu(bn2(conv1(relu(bn1(cat(features))))))``, ``growth_rate`` new channels.

    ``features`` is the list of all earlier feature maps of the block, concatenated on the channel
    axis (``torch.cat``) before the first BN; both ReLUs are ``inplace=True``, as torchvision.

    Shape: a list of ``(N, C_i, H, W)`` with ``Σ C_i = num_input_features`` → ``(N, growth_rate, H, W)``.

    Example::

        >>> layer = DenseLayer(16, growth_rate=8, bn_size=2)
        >>> layer([torch.randn(2, 10, 8, 8), torch.randn(2, 6, 8, 8)]).shape
        torch.Size([2, 8, 8, 8])

    Reference: Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional Networks",
    CVPR 2017; torchvision.models.densenet._DenseLayer.
    """

    def __init__(
        self, num_input_features: int, growth_rate: int, bn_size: int, norm_layer: NormLayer | None = None
    ) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        self.norm1 = norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = _conv1x1(num_input_features, bn_size * growth_rate)
        self.norm2 = norm(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(bn_size * growth_rate, growth_rate)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """``num_layers`` :class:`DenseLayer` s, each fed the concatenation of the input and all earlier outputs.

    Shape: ``(N, C, H, W)`` → ``(N, C + num_layers · growth_rate, H, W)``.
    Example: ``DenseBlock(2, 8, bn_size=2, growth_rate=4)(torch.randn(2, 8, 6, 6))`` has 16 channels.
    Reference: Huang et al., CVPR 2017; torchvision.models.densenet._DenseBlock.
    """

    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            self[f"denselayer{i + 1}"] = DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """DenseNet transition: BN → ReLU(inplace) → 1×1 conv → 2×2 average pool.

    Shape: ``(N, cin, H, W)`` → ``(N, cout, H/2, W/2)``. Example: ``Transition(16, 8)(torch.randn(2, 16, 8, 8))``.
    Reference: Huang et al., CVPR 2017; torchvision.models.densenet._Transition.
    """

    def __init__(self, cin: int, cout: int, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        self.norm = _norm(norm_layer)(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = _conv1x1(cin, cout)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """A small DenseNet-BC: stem (conv, BN, ReLU, max-pool), dense blocks with transitions, final BN, classifier.

    Shape: ``(N, 3, H, W)`` → ``(N, num_classes)``.

    Example::

        >>> net = DenseNet(num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])

    Reference: Huang et al., CVPR 2017; torchvision.models.DenseNet (``norm5`` followed by a functional
    in-place ReLU).
    """

    def __init__(
        self, num_classes: int = 10, growth_rate: int = 8, block_config: tuple[int, ...] = (2, 2),
        num_init_features: int = 16, bn_size: int = 2, norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        norm = _norm(norm_layer)
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 3, 1, 1, bias=False))
        self.features.add_module("norm0", norm(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        c = num_init_features
        for i, n in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(n, c, bn_size, growth_rate, norm))
            c += n * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(c, c // 2, norm))
                c //= 2
        self.features.add_module("norm5", norm(c))
        self.classifier = nn.Linear(c, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.features(x), inplace=True)
        out = nn.functional.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def densenet_tiny(num_classes: int = 10, norm_layer: NormLayer | None = None) -> DenseNet:
    """A DenseNet-BC with two dense blocks of two layers (growth 8) and one transition: 10 BN layers.

    Shape: ``(N, 3, 32, 32)`` → ``(N, num_classes)``. Example: ``densenet_tiny()(torch.randn(2, 3, 32, 32))``.
    Reference: Huang et al., CVPR 2017.
    """
    return DenseNet(num_classes, norm_layer=norm_layer)


def _init(model: nn.Module) -> None:
    """torchvision's initialization: Kaiming-normal (fan_out) convs, BN γ=1 β=0, small-normal linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
        elif hasattr(m, "reset_parameters") and hasattr(m, "running_mean"):
            m.reset_parameters()


#: name → constructor ``f(num_classes=10, norm_layer=None)`` of the four small models; inputs ``(N, 3, 32, 32)``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": lambda num_classes=10, norm_layer=None: resnet18_cifar(num_classes, 8, norm_layer),
    "mobilenet_v2_tiny": mobilenet_v2_tiny,
    "efficientnet_tiny": efficientnet_tiny,
    "densenet_tiny": densenet_tiny,
}

#: name → ``(constructor(norm_layer=None), input channels)`` of single blocks, each with its residual/concat idiom.
BLOCKS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "basic_block": (lambda norm_layer=None: BasicBlock(8, 8, 1, norm_layer), 8),
    "basic_block_down": (lambda norm_layer=None: BasicBlock(8, 16, 2, norm_layer), 8),
    "inverted_residual": (lambda norm_layer=None: InvertedResidual(8, 8, 1, 4, norm_layer), 8),
    "mbconv": (lambda norm_layer=None: MBConv(8, 8, 4, 3, 1, norm_layer), 8),
    "dense_block": (lambda norm_layer=None: DenseBlock(2, 8, 2, 4, norm_layer), 8),
    "transition": (lambda norm_layer=None: Transition(8, 4, norm_layer), 8),
}


def example_input(
    channels: int = 3, batch: int = 4, size: int = 32, channels_last: bool = False, seed: int = 0
) -> torch.Tensor:
    """A reproducible random batch ``(batch, channels, size, size)``, optionally in channels-last memory format.

    Shape: ``(batch, channels, size, size)``. Example: ``example_input(8, batch=2, size=8, channels_last=True)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# -- timm's and torchvision's own BN classes (faithful small stand-ins: timm and torchvision do not import here) --
#
# Written from the published behaviour of timm 1.0 (``timm.layers.norm_act``, ``timm.layers.FrozenBatchNorm2d``,
# ``timm.utils.model.freeze``) and torchvision 0.2x / detectron2 (``FrozenBatchNorm2d``): the same class names,
# attributes, buffers, children and forward semantics, which is what batchnorm's tools and tests look at.


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d``: a ``torch.nn.BatchNorm2d`` subclass that applies its own ``drop`` then ``act``.

    ``y = act(drop(batch_norm(x)))`` with torch's training/eval rules (momentum, ``momentum=None`` cumulative
    average, batch statistics in eval when there are no running buffers). ``act`` is ``act_layer(inplace=...)``
    (``nn.Identity`` when ``apply_act=False``), ``drop`` is ``drop_layer()`` or ``nn.Identity``.
    Used by timm's EfficientNet, MobileNetV3, RegNet and DenseNet.

    Shape: ``(N, C, H, W)`` → same. Example: ``BatchNormAct2d(8, act_layer=nn.SiLU)(torch.randn(2, 8, 4, 4))``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, apply_act: bool = True, act_layer: type = nn.ReLU,
                 act_kwargs: dict | None = None, inplace: bool = True, drop_layer: type | None = None,
                 device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = torch.nn.functional.batch_norm(
            x, self.running_mean if keep else None, self.running_var if keep else None, self.weight, self.bias,
            use_batch, factor, self.eps)
        return self.act(self.drop(x))


def _make_act(act_layer, act_kwargs, inplace: bool) -> nn.Module:
    kwargs = dict(act_kwargs or {})
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:  # activations without inplace= (GELU, Sigmoid, Tanh, ...)
        return act_layer(**kwargs)


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's ``SyncBatchNormAct``: ``torch.nn.SyncBatchNorm`` followed by its own ``drop`` and ``act`` children.

    Shape: ``(N, C, *)`` → same. Example: ``SyncBatchNormAct(8).eval()(torch.randn(2, 8, 4, 4))``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, act_layer: type = nn.ReLU,
                 inplace: bool = True, drop_layer: type | None = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, None, inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNorm2d(nn.Module):
    """torchvision's (and timm's, and detectron2's) ``FrozenBatchNorm2d``: fixed statistics and affine, as buffers.

    ``y = x · scale + shift`` with ``scale = weight · rsqrt(running_var + eps)``, ``shift = bias − running_mean ·
    scale``; buffers ``weight, bias, running_mean, running_var`` (no parameters); ``num_batches_tracked`` in a
    checkpoint is dropped on load. Not a ``_BatchNorm`` subclass.

    Shape: ``(N, C, H, W)`` → same. Example: ``FrozenBatchNorm2d(8)(torch.randn(2, 8, 4, 4))``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FrozenBatchNormAct2d(nn.Module):
    """timm's ``FrozenBatchNormAct2d``: :class:`FrozenBatchNorm2d`'s map, then its own ``drop`` and ``act``.

    Shape: ``(N, C, H, W)`` → same. Example: ``FrozenBatchNormAct2d(8)(torch.randn(2, 8, 4, 4))``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, apply_act: bool = True, act_layer: type = nn.ReLU,
                 act_kwargs: dict | None = None, inplace: bool = True, drop_layer: type | None = None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _make_act(act_layer, act_kwargs, inplace) if apply_act else nn.Identity()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                           0.0, self.eps)
        return self.act(self.drop(x))


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm's ``freeze_batch_norm_2d``: BatchNorm2d / SyncBatchNorm → :class:`FrozenBatchNorm2d`, BatchNormAct2d /
    SyncBatchNormAct → :class:`FrozenBatchNormAct2d` (act and drop kept), found by ``isinstance``, recursively.

    As timm: the frozen layer is built from the BN's attributes (``num_features``, ``eps``, ``affine``, the
    buffers and, when affine, the parameters' data); children of other modules are replaced in place
    (``add_module``); the converted root is returned. Shape: unchanged.
    Example: ``freeze_batch_norm_2d(nn.Sequential(nn.BatchNorm2d(4)))[0]`` is a FrozenBatchNorm2d.
    """
    res = module
    if isinstance(module, (BatchNormAct2d, SyncBatchNormAct)):
        res = FrozenBatchNormAct2d(module.num_features, eps=module.eps)
        res.act, res.drop = module.act, module.drop
    elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        res = FrozenBatchNorm2d(module.num_features, eps=module.eps)
    if res is not module:
        res.num_features = module.num_features
        res.affine = module.affine
        if module.affine:
            res.weight.data = module.weight.data.clone().detach()
            res.bias.data = module.bias.data.clone().detach()
        res.running_mean.data = module.running_mean.data
        res.running_var.data = module.running_var.data
        res.eps = module.eps
        return res
    for name, child in module.named_children():
        new = freeze_batch_norm_2d(child)
        if new is not child:
            res.add_module(name, new)
    return res


def freeze(root: nn.Module) -> nn.Module:
    """``timm.utils.model.freeze`` on the whole model: no parameter learns, every BN becomes frozen (in place).

    Parameters get ``requires_grad=False``; then :func:`freeze_batch_norm_2d`. Returns the root (a new module only
    when the root itself is a BN). Shape: unchanged. Example: ``freeze(model)``.
    """
    for p in root.parameters():
        p.requires_grad_(False)
    return freeze_batch_norm_2d(root)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """timm's ``convert_sync_batchnorm``: every ``_BatchNorm`` → ``torch.nn.SyncBatchNorm`` built from torch's
    attributes (``BatchNormAct2d`` → :class:`SyncBatchNormAct`, act and drop kept), parameters and buffers shared.
    Built from one of our layers that torch's class cannot express (fused activation, ``axis != 1``, ghost batches,
    renorm, act/drop modules), the torch layer refuses to run (``RuntimeError``; ``batchnorm.layers.interop``).

    Shape: unchanged. Example: ``convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)))[0]`` is a SyncBatchNorm.
    """
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if isinstance(module, BatchNormAct2d):
            out = SyncBatchNormAct(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, process_group=process_group)
            out.act, out.drop = module.act, module.drop
        else:
            out = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        if isinstance(out, nn.modules.batchnorm._BatchNorm) and out is not module and name in ("act", "drop"):
            continue  # already carried above
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out


def timm_block(act_layer: type = nn.SiLU, frozen: bool = False) -> nn.Module:
    """A timm-style conv → BatchNormAct2d → conv → BatchNormAct2d block (EfficientNet/MobileNetV3 idiom).

    Shape: ``(N, 3, H, W)`` → ``(N, 8, H, W)``. Example: ``timm_block(nn.Hardswish)(example_input(3, size=8))``.
    """
    norm = BatchNormAct2d
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8, act_layer=act_layer),
                          nn.Conv2d(8, 8, 1, bias=False), norm(8, apply_act=False))
    _init(block)
    return freeze_batch_norm_2d(block) if frozen else block
