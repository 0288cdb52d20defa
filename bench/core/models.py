"""Registered architectures. Every model takes pixels in [0, 1]; normalization is its first
layer (buffers), so an eps always means the same thing (RobustBench/AutoAttack convention).

A model function's name is its registry key (timm style). Each takes the dataset's
`num_classes`, `input_shape` (C, H, W), `mean` and `std`, plus its own keyword arguments.
`build_model` records the full spec on the model so a checkpoint can rebuild it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.config import resolve_params
from bench.core.errors import BenchError
from bench.core.registry import Registry

MODELS: Registry = Registry("model", plugins=("bench.core.planted",))
register_model = MODELS.register


class Normalize(nn.Module):
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_model(name: str, *, num_classes: int, input_shape: Sequence[int], mean: Sequence[float],
                std: Sequence[float], **kwargs) -> nn.Module:
    kwargs = model_params(name, kwargs)
    spec = {"name": name, "num_classes": int(num_classes), "input_shape": [int(s) for s in input_shape],
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "kwargs": kwargs}
    try:
        net = MODELS.get(name)(num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:  # e.g. an input too small for the architecture
        raise BenchError(f"cannot build model {name!r} with {kwargs} for inputs {tuple(input_shape)} and "
                         f"{num_classes} classes: {str(exc).splitlines()[0][:200]}") from None
    model = nn.Sequential()
    model.add_module("normalize", Normalize(mean, std))
    model.add_module("net", net)
    model.spec = spec  # type: ignore[attr-defined]
    return model


def model_params(name: str, params: dict) -> dict:
    """The model's keyword arguments with defaults filled in. Unknown names, values of the wrong
    type and integers below 1 (every integer parameter of a registered model is a size: width,
    hidden units, depth) are BenchErrors."""
    out = resolve_params(MODELS.get(name), params, ("num_classes", "input_shape"), f"model {name!r}")
    small = [f"{k} must be >= 1, got {v}" for k, v in out.items() if type(v) is int and v < 1]
    if small:
        raise BenchError(f"bad parameters for model {name!r}: {'; '.join(small)}")
    return out


def build_model_from_spec(spec: dict) -> nn.Module:
    return build_model(spec["name"], num_classes=spec["num_classes"], input_shape=spec["input_shape"],
                       mean=spec["mean"], std=spec["std"], **spec.get("kwargs", {}))


class Preprocessing(nn.Module):
    """A declared input transform that has no useful gradient (quantization, JPEG, thermometer
    encoding): `forward` is the transform, `approximate` a differentiable approximation of it. A
    model that contains one says so, and an adaptive attack differentiates through `approximate`
    instead (BPDA, Athalye et al. 2018, §4.1); the default is the identity, their straight-through
    estimator."""

    def approximate(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --------------------------------------------------------------------------- classifier heads

HEADS = ("linear", "cosine")


class CosineClassifier(nn.Module):
    """Normalized head: logit j = cos θ_j between the feature and a unit-norm class prototype
    w_j (no bias), in [−1, 1]. Losses that want s·cos θ (NCE/CosFace, SPAT) scale it themselves."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).t()


def classifier_head(in_features: int, num_classes: int, head: str) -> nn.Module:
    """The last layer of every registered model: "linear" (default) or "cosine" (normalized prototypes)."""
    if head not in HEADS:
        raise BenchError(f"unknown head {head!r}; accepted: {', '.join(HEADS)}")
    return nn.Linear(in_features, num_classes) if head == "linear" else CosineClassifier(in_features, num_classes)


# --------------------------------------------------------------------------- MLP

@register_model()
def mlp(num_classes: int, input_shape: tuple, hidden: int = 256, depth: int = 2, head: str = "linear") -> nn.Module:
    """A fully connected ReLU network (`depth` hidden layers of `hidden` units): a cheap second
    architecture for surrogates and ensembles on small images."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, classifier_head(width, num_classes, head))


# --------------------------------------------------------------------------- small CNN

@register_model()
def small_cnn(num_classes: int, input_shape: tuple, width: int = 32, hidden: int = 200, head: str = "linear") -> nn.Module:
    """The 4-conv + 3-FC CNN of the TRADES MNIST experiments (Zhang et al. 2019), sized
    from the input so it also fits 8×8 digits. Widths 32-32-64-64, hidden 200-200."""
    c, h, w = input_shape
    features = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = 2 * width * (h // 4) * (w // 4)
    return nn.Sequential(
        features,
        nn.Linear(flat, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        classifier_head(hidden, num_classes, head),
    )


# --------------------------------------------------------------------------- PreAct ResNet-18

class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int, head: str = "linear"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        layers, in_planes = [], 64
        for i, n in enumerate(num_blocks):
            planes = 64 * 2 ** i
            for j in range(n):
                layers.append(PreActBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = classifier_head(in_planes, num_classes, head)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model()
def preact_resnet18(num_classes: int, input_shape: tuple, head: str = "linear") -> nn.Module:
    """PreAct ResNet-18 (He et al. 2016), the architecture of Wong et al. 2020 and Rice et al. 2020."""
    return PreActResNet([2, 2, 2, 2], num_classes, input_shape[0], head)


# --------------------------------------------------------------------------- Wide ResNet

class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int, head: str = "linear"):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise BenchError(f"wrn depth must be 6n+4 (e.g. 28, 34), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = classifier_head(in_planes, num_classes, head)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


@register_model()
def wrn(num_classes: int, input_shape: tuple, depth: int = 34, width: int = 10, head: str = "linear") -> nn.Module:
    """Wide ResNet (Zagoruyko & Komodakis 2016); WRN-34-10 is Madry et al./TRADES' CIFAR model,
    WRN-28-10 Carmon et al.'s. Set `depth` and `width`."""
    return WideResNet(depth, width, num_classes, input_shape[0], head)


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block with the model in eval mode, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

