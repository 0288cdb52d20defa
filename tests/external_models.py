"""Models defined outside atbench, as a user or RobustBench brings them: none is a registered
architecture. `bench eval --model external_models:NAME` finds them while the tests run (pytest puts
this folder on sys.path); the closing measurements of issue 10 use them too.

- `digits_net`: a small CNN for 1x8x8 digits that expects normalized inputs (its user passes
  --normalize, or normalize=(mean, std) to atbench.evaluate);
- `wide_resnet`: a WideResNet with the parameter names of RobustBench's zoo architecture
  (conv1, block1.layer.0.bn1, ..., convShortcut, bn1, fc), so that a checkpoint in the zoo's
  layout ({"state_dict": {"module." + name: tensor}}) loads into it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsNet(nn.Module):
    """conv 3x3 (8) → conv 3x3 stride 2 (16) → linear (10), ReLUs; inputs normalized."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def digits_net(width: int = 8) -> DigitsNet:
    return DigitsNet(width)


class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, 1x1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return y + (x if self.equalInOut else self.convShortcut(o))


class Stage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) on [0, 1] inputs, three stages of (depth − 4)/6 blocks."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = Stage(n, widths[0], widths[1], 1)
        self.block2 = Stage(n, widths[1], widths[2], 2)
        self.block3 = Stage(n, widths[2], widths[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wide_resnet(depth: int = 28, widen_factor: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(depth, widen_factor, in_channels=in_channels)


def train_digits_net(data, steps: int = 60, seed: int = 0) -> tuple[DigitsNet, list[float], list[float]]:
    """A DigitsNet trained on `data` (digits) on inputs normalized by the training split's own mean
    and std (full-batch Adam, lr 1e-2): (model in eval mode, mean, std)."""
    mean, std = [data.train_x.mean().item()], [data.train_x.std().item()]
    torch.manual_seed(seed)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = (data.train_x - mean[0]) / std[0]
    for _ in range(steps):
        loss = F.cross_entropy(model(x), data.train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), mean, std
