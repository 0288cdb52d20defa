"""BPDA at the activations: the answer to elementwise layers whose derivative is not their slope
(gradient-shattering activations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from bench.core.config import require
from bench.core.remedy import (ATTACK_FAILURES, APGDBudget, Remedy, RemedyContext, forward_backward, recover_logits,
                               register_remedy)

TINY = 1e-12


@dataclass
class Layer:
    """An elementwise layer of the model (a leaf module), its secant step `h` and how far its
    derivative departs from its slope at that step (`ratio`: mean (derivative − slope)² over
    mean slope², on the probe's inputs of the layer)."""

    module: nn.Module
    name: str
    h: float
    ratio: float


def elementwise_layers(model: nn.Module, x: torch.Tensor, scale: float) -> list[Layer]:
    """The leaf modules of `model` that act elementwise on one floating-point tensor, not in place
    (an input moved on a random half of its entries changes the output on that half only, and a
    repeated call gives the same output), each with its secant step h = `scale` × the standard deviation of
    its input on `x` (at its first call) and its `ratio` there."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def record(module, inputs, output):
        z = inputs[0] if inputs else None
        if module not in seen and not getattr(module, "inplace", False) and isinstance(z, torch.Tensor) \
                and isinstance(output, torch.Tensor) and z.is_floating_point() and z.shape == output.shape:
            seen[module] = z.detach()

    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in hooks:
            handle.remove()
    generator = torch.Generator(device=x.device).manual_seed(0)
    out = []
    for module, z in seen.items():
        spread = z.std().item()
        if not spread > 0:
            continue
        half = torch.rand(z.shape, generator=generator, device=z.device) < 0.5
        moved = z + 0.01 * spread * torch.randn(z.shape, generator=generator, device=z.device) * half
        with torch.no_grad():
            base, again, shifted = module.forward(z), module.forward(z), module.forward(moved)
        if not torch.equal(base, again) or not torch.equal(base[~half], shifted[~half]):
            continue
        h = scale * spread
        z_grad = z.clone().requires_grad_(True)
        with torch.enable_grad():
            derivative, = torch.autograd.grad(module.forward(z_grad).sum(), z_grad, allow_unused=True)
        if derivative is None:
            derivative = torch.zeros_like(z)
        slope = secant(module, z, h)
        ratio = ((derivative - slope).pow(2).mean() / slope.pow(2).mean().clamp_min(TINY)).item()
        out.append(Layer(module, names.get(module, type(module).__name__), h, ratio))
    return out


def secant(module: nn.Module, z: torch.Tensor, h: float) -> torch.Tensor:
    """(module(z + h) − module(z − h)) / 2h, elementwise: the derivative of the module averaged
    over [z − h, z + h] (its hooks bypassed)."""
    with torch.no_grad():
        return (module.forward(z + h) - module.forward(z - h)) / (2 * h)


def _secant_hook(h: float):
    def hook(module, inputs, output):
        z = inputs[0]
        return forward_backward(output, z * secant(module, z.detach(), h))  # the module's value, its slope
    return hook


class SecantBPDA(nn.Module):
    """The model with each of `layers` computed as itself in the forward pass and differentiated
    by its secant slope in the backward pass; logits recovered (`recover_logits`)."""

    def __init__(self, model: nn.Module, layers: list[Layer]):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, x):
        hooks = [layer.module.register_forward_hook(_secant_hook(layer.h)) for layer in self.layers]
        try:
            return recover_logits(self.model(x))
        finally:
            for handle in hooks:
                handle.remove()


@register_remedy("bpda_secant")
class BPDASecant(Remedy):
    """BPDA at the activations (Athalye et al. 2018, §4.1: on the backward pass, replace a layer
    whose gradient is useless by the derivative of a differentiable approximation of it): an
    elementwise layer f whose derivative does not follow its values (activations that shatter the
    gradient, as k-winners-take-all or oscillating activations do; a staircase activation whose
    derivative is zero) is differentiated through its local average (1/2h)∫ f over [z − h, z + h],
    whose derivative is the secant slope (f(z + h) − f(z − h)) / 2h; the forward pass stays the
    model's. The layers are found by probing the model (`elementwise_layers` on the first
    `probe_samples` inputs): a leaf module acting elementwise whose derivative departs from its
    slope at h = `scale` × its input's spread by at least `min_ratio` of the slope's energy (0.5:
    a zero derivative against a non-zero slope gives 1, a ReLU's kink about 0.01). APGD-CE and
    APGD-T (from 4 classes) on that view. Defaults: AutoAttack's APGD (100 steps, 1 restart, 9
    target classes)."""

    title = "BPDA secant (activations)"
    paper = "Athalye et al. 2018 §4.1"
    answers = ("gradients_nonzero",) + ATTACK_FAILURES
    order = 5
    revision = 2  # 2: logits rescaled only where their spread saturates the cross-entropy (`recover_logits`)

    @dataclass(frozen=True)
    class Config(APGDBudget):
        probe_samples: int = 32
        scale: float = 0.05
        min_ratio: float = 0.5

        def __post_init__(self):
            super().__post_init__()
            require(self, at_least_one=("probe_samples",), positive=("scale", "min_ratio"))

    def layers(self, ctx: RemedyContext) -> list[Layer]:
        """The model's elementwise layers with a misleading derivative (probed once per checkpoint)."""
        c = self.config
        key = ("secant_layers", c.probe_samples, c.scale)
        if key not in ctx.cache:
            ctx.cache[key] = elementwise_layers(ctx.model, ctx.x[:c.probe_samples], c.scale)
        return [layer for layer in ctx.cache[key] if layer.ratio >= c.min_ratio]

    def applies(self, ctx):
        if self.layers(ctx):
            return None
        c = self.config
        probed = ctx.cache[("secant_layers", c.probe_samples, c.scale)]
        worst = max((layer.ratio for layer in probed), default=0.0)
        return (f"no elementwise layer's derivative departs from its slope (largest ratio {worst:.2g} of "
                f"{len(probed)} layer(s), needs >= {c.min_ratio:g})")

    def attacks(self, ctx):
        return self.config.apgd_ce_and_t(ctx)

    def view(self, model, ctx):
        return SecantBPDA(model, self.layers(ctx))
