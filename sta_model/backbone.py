"""Convolutional trunks: torchvision-layout ResNet-50/18 and a tiny CPU trunk.

The ResNets reproduce torchvision's module and parameter names exactly (conv1, bn1, relu, maxpool,
layer1..layer4; Bottleneck/BasicBlock with conv1/bn1/conv2/bn2/(conv3/bn3)/downsample.0/.1, stride on
the 3x3 conv as in torchvision's "ResNet v1.5") so that a torchvision ImageNet ``state_dict`` loads
unchanged. The global pool and fc are left out: the trunk returns feature maps.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetTrunk(nn.Module):
    """ResNet without avgpool/fc; ``layer4`` stride set by ``last_stride``.

    Attributes:
        out_channels (int): channels of the output maps.
        stride (int): total downsampling factor (16 with last_stride=1, 32 with 2).
    """

    def __init__(self, block: type, layers: tuple, last_stride: int = 1):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], last_stride)
        self.out_channels = 512 * block.expansion
        self.stride = 16 * last_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class TinyTrunk(nn.Module):
    """Four conv-BN-ReLU stages (16, 32, 64, 64 channels) for tests and CPU demos.

    Strides 2, 2, 2, ``last_stride``: a 64x32 frame becomes 8x4 maps with the default last_stride=1.
    """

    def __init__(self, last_stride: int = 1, widths: tuple = (16, 32, 64, 64)):
        super().__init__()
        strides = (2, 2, 2, last_stride)
        layers, cin = [], 3
        for cout, s in zip(widths, strides):
            layers += [nn.Conv2d(cin, cout, 3, s, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = widths[-1]
        self.stride = 8 * last_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


_RESNETS = {"resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet18": (BasicBlock, (2, 2, 2, 2))}
TRUNKS = ("resnet50", "resnet18", "tiny")


def read_state_dict(source: str) -> dict:
    """Read a state dict from a local path, ``file://`` URL or http(s) URL.

    Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` checkpoints and strips ``module.`` prefixes
    (DataParallel/DDP saves).
    """
    if source.startswith(("http://", "https://")):
        sd = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False,
                                                    weights_only=True)
    else:
        path = source[len("file://"):] if source.startswith("file://") else source
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights not found: {source}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{source} does not hold a state dict (got {type(sd).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def build_trunk(name: str, last_stride: int = 1, pretrained: str | None = None) -> nn.Module:
    """Build a trunk mapping ``(B, 3, H, W)`` to ``(B, C, H/stride, W/stride)``.

    Args:
        name (str): ``"resnet50"`` (paper), ``"resnet18"`` or ``"tiny"``.
        last_stride (int): stride of the last stage (1 in the paper, 2 in the stock ResNet).
        pretrained (str, optional): path or URL of weights in torchvision's layout; ``fc.*``
            keys are ignored, every other key must match (strict).

    Returns:
        nn.Module: with attributes ``out_channels`` and ``stride``.
    """
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    if name in _RESNETS:
        block, layers = _RESNETS[name]
        trunk = ResNetTrunk(block, layers, last_stride)
    elif name == "tiny":
        trunk = TinyTrunk(last_stride)
    else:
        raise ValueError(f"unknown trunk {name!r}; expected one of {TRUNKS}")
    if pretrained:
        sd = {k: v for k, v in read_state_dict(pretrained).items() if not k.startswith("fc.")}
        trunk.load_state_dict(sd, strict=True)
    return trunk
