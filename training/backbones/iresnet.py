"""IResNet, the ResNet variant of face recognition (ArcFace paper, insightface).

Residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN (-> SE) + shortcut.
Output layer: BN -> dropout -> flatten -> FC -> BN1d, giving the embedding (not normalised).
Input: float [N, 3, 112, 112], RGB scaled to [-1, 1]. ``width`` scales every channel count so
tests and the CPU demo can use the same architecture at a fraction of the cost.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cdface.training.backbones.registry import register_backbone

STAGE_CHANNELS = (64, 128, 256, 512)
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}
INPUT_SIZE = 112


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(self.pool(x)))))


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, se: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return self.se(out) + self.shortcut(x)


class IResNet(nn.Module):
    def __init__(
        self,
        depths: tuple[int, int, int, int],
        width: float = 1.0,
        embedding_size: int = 512,
        dropout: float = 0.0,
        se: bool = False,
    ):
        super().__init__()
        if width <= 0:
            raise ValueError("width must be positive")
        channels = [max(int(round(c * width)), 4) for c in STAGE_CHANNELS]
        self.embedding_size = embedding_size
        self.stem = nn.Sequential(_conv3x3(3, channels[0]), nn.BatchNorm2d(channels[0], eps=1e-5),
                                  nn.PReLU(channels[0]))
        stages, cin = [], channels[0]
        for depth, cout in zip(depths, channels):
            blocks = [IBasicBlock(cin, cout, 2, se)] + [IBasicBlock(cout, cout, 1, se) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        spatial = INPUT_SIZE // 16  # four stride-2 stages: 112 -> 7
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        # As in the reference models: the last BN only centres and rescales per dimension, no learnt gain.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Zero-init the last BN of each residual unit: every unit starts as the identity.
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.constant_(m.bn3.weight, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _make(depth: int, se: bool):
    def build(width: float = 1.0, embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
        return IResNet(DEPTHS[depth], width=width, embedding_size=embedding_size, dropout=dropout, se=se)

    build.__doc__ = f"IResNet-{depth}{' with squeeze-excitation' if se else ''}."
    return build


for _depth in DEPTHS:
    register_backbone(f"ir{_depth}")(_make(_depth, se=False))
    register_backbone(f"ir_se{_depth}")(_make(_depth, se=True))
