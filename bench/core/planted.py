"""Planted defenses: wrappers around a trained model that make it look robust without being so —
the failure modes the sanity checks must catch (Athalye et al. 2018; Carlini et al. 2019):

- `quantized`: the input is rounded to a few grey levels (a shattered, zero gradient);
- `softmax`: the model returns probabilities instead of logits (saturated cross-entropy gradients);
- `scaled_logits`: the logits are multiplied by a huge constant (cross-entropy gradients underflow
  to zero, a margin loss still works);
- `noisy`: Gaussian noise is added to the input at inference too (randomized outputs).

`bench.engine.checkpoint.plant` writes a model checkpoint of a trained model wrapped by one of them
(registered model `planted`), which the harness evaluates like any other.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bench.core.errors import BenchError
from bench.core.models import MODELS, register_model

QUANTIZE_LEVELS = 4        # grey levels of `quantized` (a step of 1/3 in normalized units, zero gradient)
LOGIT_SCALE = 1e4          # `scaled_logits`: margins of a few units become 1e4, exp underflows in float32
NOISE_STD = 0.1            # `noisy`: std of the Gaussian noise on the (normalized) input


class Quantized(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * QUANTIZE_LEVELS) / QUANTIZE_LEVELS)


class Softmax(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.softmax(self.inner(x), dim=1)


class ScaledLogits(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return LOGIT_SCALE * self.inner(x)


class NoisyInput(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x + NOISE_STD * torch.randn_like(x))


PLANTS = {"quantized": Quantized, "softmax": Softmax, "scaled_logits": ScaledLogits, "noisy": NoisyInput}


@register_model()
def planted(num_classes: int, input_shape: tuple, plant: str = "softmax", base: str = "small_cnn",
            base_params: dict | None = None) -> nn.Module:
    """A registered architecture `base` (with `base_params`) wrapped by the planted failure `plant`."""
    if plant not in PLANTS:
        raise BenchError(f"unknown plant {plant!r}; accepted: {', '.join(PLANTS)}")
    if base == "planted":
        raise BenchError("a planted model cannot wrap another planted model")
    return PLANTS[plant](MODELS.get(base)(num_classes=num_classes, input_shape=input_shape, **(base_params or {})))
