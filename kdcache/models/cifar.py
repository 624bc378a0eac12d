"""The CIFAR networks of the distillation literature (CRD, mdistiller), kdcache's built-in models
(``resnet8x4``, also ``builtin:resnet8x4``). The ResNets keep those repositories' parameter names, so their
checkpoints load as they are. All end in an adaptive average pool, so any input size from 8x8 up works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdcache.errors import InvalidSpec


class BasicBlock(nn.Module):
    """The two-conv residual block of CIFAR ResNets."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: 3x3 stem of ``widths[0]`` channels, then ``layer1..3`` of n
    BasicBlocks with ``widths[1..3]`` channels (strides 1, 2, 2), adaptive pool, ``fc``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(inplanes, planes, stride),
                             *(BasicBlock(planes, planes) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBlock(nn.Module):
    """The pre-activation block of Wide ResNets."""

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem of 16 channels, ``layer1..3`` of (depth-4)/6 WideBlocks with 16k, 32k,
    64k channels, final BN-ReLU, adaptive pool, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init(self)

    @staticmethod
    def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(WideBlock(inplanes, planes, stride),
                             *(WideBlock(planes, planes, 1) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
    """Two conv-ReLU-maxpool layers (16 and 32 channels) and a linear classifier: for fast tests."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
                                    nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


def _init(model: nn.Module) -> None:
    """The initialisation of the CRD/mdistiller CIFAR networks."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _resnet(depth: int, widths: tuple[int, int, int, int]) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, in_channels)
    return factory


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return WideResNet(depth, widen, num_classes, in_channels)
    return factory


_NARROW, _WIDE = (16, 16, 32, 64), (32, 64, 128, 256)
# name -> (factory(num_classes=, in_channels=), description)
BUILTINS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "cnn": (SmallCNN, "2 conv layers + linear (layer1, layer2, fc), for tests"),
    **{f"resnet{d}": (_resnet(d, _NARROW), f"CIFAR ResNet-{d}, widths 16/32/64")
       for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (_resnet(8, _WIDE), "CIFAR ResNet-8, widths 64/128/256: a common KD student"),
    "resnet32x4": (_resnet(32, _WIDE), "CIFAR ResNet-32, widths 64/128/256: a common KD teacher"),
    **{f"wrn_{d}_{k}": (_wrn(d, k), f"Wide ResNet-{d}-{k}")
       for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
}


def build(spec: str, name: str, num_classes: int, in_channels: int) -> nn.Module:
    """The built-in network ``name``, untrained."""
    if name not in BUILTINS:
        raise InvalidSpec(f"unknown model {spec!r} — use one of {', '.join(BUILTINS)}, "
                          "torchvision:NAME, timm:NAME or module.path:callable")
    return BUILTINS[name][0](num_classes=num_classes, in_channels=in_channels)
