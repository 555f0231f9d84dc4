"""Alternative DIANet encoders: a ResNet-50-style and a MobileNetV3-style backbone.

Both are plain PyTorch (no pretrained weights) and return what DIANet's pyramid fusion and
detail skip consume: the stem activation (stride 2) and four stage outputs at strides
4, 8, 16 and 32, finest first. ``width`` multiplies every channel count (rounded to a
multiple of 8, at least 8) so the same layout can be made small for tests or tiny inputs.

* :class:`ResNet50Backbone`: 7 x 7 stride-2 stem, 3 x 3 max pool, then bottleneck residual
  blocks (1x1 reduce, 3x3, 1x1 expand x4) in the ResNet-50 layout 3-4-6-3; the first block
  of a stage carries the stride and a 1 x 1 projection shortcut.
* :class:`MobileNetV3Backbone`: 3 x 3 stride-2 hardswish stem, then the MobileNetV3-Large
  inverted-residual blocks (1x1 expand, depthwise k x k, optional squeeze-excitation with a
  hard sigmoid gate, 1x1 linear project; ReLU or hardswish), without the final 1 x 1
  classifier convolutions.

Both expose ``stem`` and ``stages`` (a ``ModuleList``, one entry per stride) like the small
encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

#: Backbone names accepted by ``DIANetConfig.backbone``.
BACKBONES: tuple[str, ...] = ("small", "resnet50", "mobilenetv3")

#: Stage outputs each backbone here provides (strides 4, 8, 16, 32).
NUM_LEVELS = 4


def scaled(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    if width <= 0:
        raise ValueError(f"backbone width multiplier must be positive, got {width}")
    value = channels * width
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # do not round down by more than 10 %
        rounded += divisor
    return rounded


class Backbone(nn.Module, ABC):
    """Common interface: ``forward(x) -> (stem, [C1, C2, C3, C4])``."""

    #: Channels of the stem activation.
    stem_channels: int
    #: Channels of each stage output, finest first.
    level_widths: tuple[int, ...]

    @abstractmethod
    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """The stem activation and the stage outputs, finest first."""


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (stride), 1x1 expand, residual add, ReLU."""

    expansion = 4

    def __init__(self, cin: int, mid: int, stride: int = 1) -> None:
        super().__init__()
        cout = mid * self.expansion
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        # Zero-initialised last BN: each block starts as the identity (stable deep training).
        nn.init.zeros_(self.bn3.weight)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + self.shortcut(x))


class ResNet50Backbone(Backbone):
    """ResNet-50 layout (bottleneck blocks 3-4-6-3, base widths 64-128-256-512, x4 expansion)."""

    BLOCKS: tuple[int, ...] = (3, 4, 6, 3)
    BASE_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        stem = scaled(64, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        layers: list[nn.Module] = []
        widths: list[int] = []
        cin = stem
        for i, (blocks, base) in enumerate(zip(self.BLOCKS, self.BASE_WIDTHS, strict=True)):
            mid = scaled(base, width)
            stage: list[nn.Module] = []
            for b in range(blocks):
                stride = 2 if (b == 0 and i > 0) else 1
                stage.append(Bottleneck(cin, mid, stride))
                cin = mid * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
            widths.append(cin)
        self.stages = nn.ModuleList(layers)
        self.stem_channels = stem
        self.level_widths = tuple(widths)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        stem = self.stem(x)
        y = self.pool(stem)
        levels: list[Tensor] = []
        for layer in self.stages:
            y = layer(y)
            levels.append(y)
        return stem, levels


class SqueezeExcitation(nn.Module):
    """Channel gate: global average pool, 1x1 reduce + ReLU, 1x1 expand + hard sigmoid."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.expand(self.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, depthwise k x k, optional SE, 1x1 linear projection."""

    def __init__(
        self, cin: int, expand: int, cout: int, kernel: int, se: bool, hswish: bool, stride: int
    ) -> None:
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if expand != cin:
            layers += [nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), act()]
        layers += [
            nn.Conv2d(
                expand, expand, kernel, stride, padding=kernel // 2, groups=expand, bias=False
            ),
            nn.BatchNorm2d(expand),
            act(),
        ]
        if se:
            layers.append(SqueezeExcitation(expand, scaled(expand // 4, 1.0)))
        layers += [nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Backbone(Backbone):
    """MobileNetV3-Large block layout; each stage starts with its stride-2 block."""

    #: (kernel, expansion, output, squeeze-excitation, hardswish, stride) per block.
    STEM_BLOCK = (3, 16, 16, False, False, 1)
    BLOCKS: tuple[tuple[tuple[int, int, int, bool, bool, int], ...], ...] = (
        ((3, 64, 24, False, False, 2), (3, 72, 24, False, False, 1)),  # stride 4
        (
            (5, 72, 40, True, False, 2),
            (5, 120, 40, True, False, 1),
            (5, 120, 40, True, False, 1),
        ),  # stride 8
        (
            (3, 240, 80, False, True, 2),
            (3, 200, 80, False, True, 1),
            (3, 184, 80, False, True, 1),
            (3, 184, 80, False, True, 1),
            (3, 480, 112, True, True, 1),
            (3, 672, 112, True, True, 1),
        ),  # stride 16
        (
            (5, 672, 160, True, True, 2),
            (5, 960, 160, True, True, 1),
            (5, 960, 160, True, True, 1),
        ),  # stride 32
    )

    def __init__(self, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        stem = scaled(16, width)
        k, e, c, se, hs, s = self.STEM_BLOCK
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.Hardswish(),
            InvertedResidual(stem, scaled(e, width), scaled(c, width), k, se, hs, s),
        )
        stem_out = cin = scaled(c, width)
        stages: list[nn.Module] = []
        widths: list[int] = []
        for spec in self.BLOCKS:
            blocks: list[nn.Module] = []
            for k, e, c, se, hs, s in spec:
                cout = scaled(c, width)
                blocks.append(InvertedResidual(cin, scaled(e, width), cout, k, se, hs, s))
                cin = cout
            stages.append(nn.Sequential(*blocks))
            widths.append(cin)
        self.stages = nn.ModuleList(stages)
        self.stem_channels = stem_out
        self.level_widths = tuple(widths)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        stem = self.stem(x)
        y = stem
        levels: list[Tensor] = []
        for stage in self.stages:
            y = stage(y)
            levels.append(y)
        return stem, levels


def build_backbone(name: str, in_channels: int, width: float) -> Backbone:
    """A :class:`Backbone` by name (``"resnet50"`` or ``"mobilenetv3"``)."""
    if name == "resnet50":
        return ResNet50Backbone(in_channels, width)
    if name == "mobilenetv3":
        return MobileNetV3Backbone(in_channels, width)
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
