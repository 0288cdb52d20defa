"""Planted defenses: wrappers around a trained model that make it look robust without being so —
the failure modes the sanity checks must catch and the adaptive remedies must undo (Athalye et
al. 2018; Carlini et al. 2019; Tramèr et al. 2020). Each sees the model's normalized input.

- `quantized`: the input is rounded to a few grey levels (a shattered, zero gradient);
- `softmax`: the model returns probabilities instead of logits (saturated cross-entropy gradients);
- `scaled_logits`: the logits are multiplied by a huge constant (cross-entropy gradients underflow
  to zero, a margin loss still works);
- `noisy`: Gaussian noise is added to the input at inference too (randomized outputs, per sample);
- `jpeg`: JPEG-style compression of the input (8×8 block DCT, coefficients rounded, inverse DCT;
  Guo et al. 2018's input transformation, broken by Athalye et al. 2018 with BPDA), declared as a
  `Preprocessing`: zero gradient, and a model that says where it is;
- `shattered`: every ReLU of the network becomes relu(x + a·sin(ωx)) with a tiny amplitude a and a
  huge frequency ω (values within a of the model's, derivatives 1 + aω·cos(ωx) of random sign):
  gradients exist and are not zero but point nowhere (shattered gradients, Athalye et al. §3.1);
- `batch_random`: with probability 1/3 per forward pass, one Gaussian noise image is added to the
  whole batch (randomness drawn per batch, not per sample, from a distribution with an atom at
  "no noise": two passes agree with probability 4/9, so a two-pass determinism test often misses it);
- `partial`: inputs on which the model is unsure (margin below a threshold) get logits with their
  gradient cut (`detach`, as defenses that leave autograd do): the function is the model's, the
  gradient vanishes only on part of the inputs, exactly where an attack needs it.

`bench.engine.checkpoint.plant` writes a model checkpoint of a trained model wrapped by one of them
(registered model `planted`), which the harness evaluates like any other.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.errors import BenchError
from bench.core.models import MODELS, Preprocessing, register_model

QUANTIZE_LEVELS = 4        # grey levels of `quantized` (a step of 1/3 in normalized units, zero gradient)
LOGIT_SCALE = 1e4          # `scaled_logits`: margins of a few units become 1e4, exp underflows in float32
NOISE_STD = 0.1            # `noisy`: std of the Gaussian noise on the (normalized) input
JPEG_BLOCK = 8             # `jpeg`: DCT block side
JPEG_STEP = 0.01           # `jpeg`: rounding step of coefficient (u, v) is JPEG_STEP·(1 + u + v), normalized units
SHATTER_AMPLITUDE = 1e-3   # `shattered`: a (activations move by at most this much)
SHATTER_FREQUENCY = 5e4    # `shattered`: ω (a·ω = 50: the oscillating term dominates every derivative)
BATCH_NOISE_P = 1 / 3      # `batch_random`: probability that a forward pass adds noise
BATCH_NOISE_STD = 0.3      # `batch_random`: std of the one noise image shared by the batch (normalized units)
PARTIAL_MARGIN = 2.0       # `partial`: logit margin below which the gradient is cut


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


def _dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (rows: frequencies)."""
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


class JpegCompression(Preprocessing):
    """8×8 block DCT, each coefficient rounded to a multiple of JPEG_STEP·(1 + u + v) (coarser at
    higher frequencies, as JPEG's tables), inverse DCT; images are zero-padded to whole blocks."""

    def forward(self, x):
        n, (h, w) = JPEG_BLOCK, x.shape[-2:]
        dct = _dct_matrix(n).to(x)
        freq = torch.arange(n, dtype=x.dtype, device=x.device)
        step = JPEG_STEP * (1 + freq[:, None] + freq[None, :])
        padded = F.pad(x, (0, -w % n, 0, -h % n))
        blocks = padded.unflatten(-2, (-1, n)).unflatten(-1, (-1, n)).transpose(-3, -2)  # (..., H/n, W/n, n, n)
        blocks = dct.T @ (torch.round(dct @ blocks @ dct.T / step) * step) @ dct
        return blocks.transpose(-3, -2).flatten(-4, -3).flatten(-2, -1)[..., :h, :w]


class Jpeg(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.compress = JpegCompression()
        self.inner = inner

    def forward(self, x):
        return self.inner(self.compress(x))


class ShatteredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x + SHATTER_AMPLITUDE * torch.sin(SHATTER_FREQUENCY * x))


class Shattered(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        relus = [name for name, m in inner.named_modules() if isinstance(m, nn.ReLU)]
        if not relus:
            raise BenchError("plant 'shattered' replaces the nn.ReLU modules of the network, and this one has none")
        for name in relus:
            parent, _, child = name.rpartition(".")
            setattr(inner.get_submodule(parent) if parent else inner, child, ShatteredReLU())
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class BatchRandom(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if torch.rand(()) < BATCH_NOISE_P:
            x = x + BATCH_NOISE_STD * torch.randn_like(x[:1])
        return self.inner(x)


class Partial(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        top2 = logits.topk(2, dim=1).values
        unsure = (top2[:, 0] - top2[:, 1] < PARTIAL_MARGIN)[:, None]
        return torch.where(unsure, logits.detach(), logits)


PLANTS = {"quantized": Quantized, "softmax": Softmax, "scaled_logits": ScaledLogits, "noisy": NoisyInput,
          "jpeg": Jpeg, "shattered": Shattered, "batch_random": BatchRandom, "partial": Partial}


@register_model()
def planted(num_classes: int, input_shape: tuple, plant: str = "softmax", base: str = "small_cnn",
            base_params: dict | None = None) -> nn.Module:
    """A registered architecture `base` (with `base_params`) wrapped by the planted failure `plant`."""
    if plant not in PLANTS:
        raise BenchError(f"unknown plant {plant!r}; accepted: {', '.join(PLANTS)}")
    if base == "planted":
        raise BenchError("a planted model cannot wrap another planted model")
    return PLANTS[plant](MODELS.get(base)(num_classes=num_classes, input_shape=input_shape, **(base_params or {})))
