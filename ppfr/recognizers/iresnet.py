"""insightface arcface_torch IResNet (r18/r34/r50/r100) for checkpoints users already have.

Same module names as `recognition/arcface_torch/backbones/iresnet.py` (conv1, bn1, prelu,
layer1..4, bn2, dropout, fc, features; blocks: bn1, conv1, bn2, prelu, conv2, bn3, downsample),
so its `backbone.pth` files load unchanged. Input: RGB 112x112 on the ArcFace template,
(x - 0.5) / 0.5.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from ppfr.recognizers.base import RECOGNIZERS, Recognizer, file_sha256, fit_state_dict, load_checkpoint

LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, + shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """The arcface_torch backbone: 112x112 input, 7x7x512 feature map, fc + BatchNorm1d embedding."""

    def __init__(self, layers: tuple[int, int, int, int], num_features: int = 512) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
            stages = [IBasicBlock(inplanes, planes, stride=2)]
            stages += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stages))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


def create_iresnet(name: str, weights: str | Path) -> Recognizer:
    """An IResNet recognizer from a user's arcface_torch checkpoint (embedding size read from the file)."""
    state = load_checkpoint(weights)
    fc = state.get("fc.weight")
    network = IResNet(LAYERS[name], num_features=fc.shape[0] if fc is not None and fc.ndim == 2 else 512)
    fit_state_dict(network, state, weights)
    return Recognizer(
        name,
        network,
        network.fc.out_features,
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        sha256=file_sha256(weights),
    )


for _depth in LAYERS:
    RECOGNIZERS.register(_depth)(create_iresnet)
