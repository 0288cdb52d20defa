"""BPDA where the model shows where its gradient breaks: through a declared preprocessing, or
through the piecewise-constant operators and gradient cuts its forward pass calls."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from bench.core.models import Preprocessing
from bench.core.remedy import ATTACK_FAILURES, APGDBudget, Remedy, forward_backward, recover_logits, register_remedy


def _straight_through(module: Preprocessing, inputs, output):
    return forward_backward(output, module.approximate(inputs[0]))


class StraightThrough(nn.Module):
    """The model, each `Preprocessing` in it computed as itself in the forward pass and
    differentiated through its `approximate` (identity: straight-through) in the backward pass;
    logits recovered (`recover_logits`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        handles = [m.register_forward_hook(_straight_through) for m in self.model.modules()
                   if isinstance(m, Preprocessing)]
        try:
            return recover_logits(self.model(x))
        finally:
            for handle in handles:
                handle.remove()


@register_remedy("bpda_ste")
class BPDAStraightThrough(Remedy):
    """Backward Pass Differentiable Approximation (Athalye et al. 2018, §4.1; Tramèr et al. 2020,
    §5.3 and §5.13): where the model declares a non-differentiable preprocessing
    (`bench.core.models.Preprocessing`: JPEG, quantization, thermometer encoding), the forward
    pass computes it and the backward pass differentiates its approximation, the identity by
    default (the straight-through estimator, which Athalye et al. used to break the JPEG and
    bit-depth defenses of Guo et al. 2018). APGD-CE and APGD-T (from 4 classes) on that view.
    Applies when the model contains a declared preprocessing. Defaults: AutoAttack's APGD (100
    steps, 1 restart, 9 target classes)."""

    title = "BPDA straight-through"
    revision = 3  # 3: logits rescaled only where their spread saturates the cross-entropy; 2: forward pass exact
    paper = "Athalye et al. 2018 §4.1"
    answers = ("gradients_nonzero",) + ATTACK_FAILURES
    order = 3

    Config = APGDBudget

    def applies(self, ctx):
        if any(isinstance(m, Preprocessing) for m in ctx.model.modules()):
            return None
        return "the model declares no non-differentiable preprocessing"

    def attacks(self, ctx):
        return self.config.apgd_ce_and_t(ctx)

    def view(self, model, ctx):
        return StraightThrough(model)


PIECEWISE_CONSTANT = frozenset({torch.round, torch.floor, torch.ceil, torch.trunc, torch.sign, torch.Tensor.round,
                                torch.Tensor.floor, torch.Tensor.ceil, torch.Tensor.trunc, torch.Tensor.sign})
GRADIENT_CUTS = frozenset({torch.Tensor.detach})


class OperatorBPDA(TorchFunctionMode):
    """While active (inside a forward pass): a piecewise-constant operator of a tensor that needs a
    gradient passes it straight through (x + (op(x) − x) held constant), a gradient cut passes it
    unchanged; `seen` records the operators met."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not x.requires_grad or func not in PIECEWISE_CONSTANT | GRADIENT_CUTS:
            return func(*args, **kwargs)
        self.seen.add(func.__name__)
        if func in GRADIENT_CUTS:
            return x.view_as(x)
        return forward_backward(func(*args, **kwargs), x)  # the mode is off inside its own handler


class OperatorStraightThrough(nn.Module):
    """The model's forward pass under `OperatorBPDA`, logits recovered (`recover_logits`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with OperatorBPDA():
            out = self.model(x)
        return recover_logits(out)


@register_remedy("bpda_ops")
class BPDAOperators(Remedy):
    """BPDA at the operators (Athalye et al. 2018, §4.1; Tramèr et al. 2020, §5, who find by
    reading a defense's code where its gradient breaks): where the model declares nothing but its
    forward pass calls piecewise-constant operators (round, floor, ceil, trunc, sign: quantization,
    JPEG, bit-depth reduction) or cuts the gradient (`detach`, as code that leaves autograd does)
    on a tensor that needs a gradient, the backward pass goes straight through them (the
    straight-through estimator; an identity for a cut). APGD-CE and APGD-T (from 4 classes) on that
    view. Applies when a forward pass of the evaluation inputs meets such an operator; a gradient
    lost to `torch.no_grad` or to code outside PyTorch is not found (the surrogate remedies answer
    that). Defaults: AutoAttack's APGD (100 steps, 1 restart, 9 target classes)."""

    title = "BPDA straight-through (operators)"
    revision = 3  # 3: logits rescaled only where their spread saturates the cross-entropy; 2: forward pass exact
    paper = "Athalye et al. 2018 §4.1; Tramèr et al. 2020 §5"
    answers = ("gradients_nonzero",) + ATTACK_FAILURES
    order = 4

    Config = APGDBudget

    def applies(self, ctx):
        mode = OperatorBPDA()
        with torch.enable_grad(), mode:
            ctx.model(ctx.x[:8].detach().requires_grad_(True))
        if mode.seen:
            return None
        return "the forward pass calls no piecewise-constant operator or gradient cut"

    def attacks(self, ctx):
        return self.config.apgd_ce_and_t(ctx)

    def view(self, model, ctx):
        return OperatorStraightThrough(model)
