"""Pre-checks: what the model alone shows, before any attack (logits, determinism, gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.adversary.losses import margin_loss
from bench.core.check import Check, CheckResult, not_run, register_check


@register_check("logits_not_probabilities")
class LogitsNotProbabilities(Check):
    """The model returns logits, not softmax probabilities (Carlini et al. 2019, §4.2): on
    probabilities, cross-entropy gradients saturate and CE attacks fail. Fails when more than half
    of the outputs are probability vectors (entries in [0, 1], summing to 1 within 1e-3)."""

    stage = "pre"

    def run(self, ctx):
        with torch.no_grad():
            out = ctx.model(ctx.x).float()
        looks = ((out >= 0) & (out <= 1)).all(1) & ((out.sum(1) - 1).abs() <= 1e-3)
        fraction = looks.float().mean().item()
        status = "fail" if fraction > 0.5 else "pass"
        return CheckResult(status, fraction, 0.5, f"{fraction:.0%} of the outputs are probability vectors"
                           + (": evaluate the logits (remove the softmax layer)" if status == "fail" else ""),
                           {"n": len(out), "min": out.min().item(), "max": out.max().item()})


@register_check("deterministic_outputs")
class DeterministicOutputs(Check):
    """Outputs are deterministic in eval mode (Athalye et al. 2018, §4.3 randomized defenses): a
    second forward pass of the same inputs gives the same logits. Randomness defeats gradient
    attacks without robustness; evaluate such a model with EOT (autoattack version "rand")."""

    stage = "pre"

    def run(self, ctx):
        with torch.no_grad():
            first, second = ctx.model(ctx.x), ctx.model(ctx.x)
        scale = first.abs().amax().clamp_min(1e-12)
        relative = ((first - second).abs().amax() / scale).item()
        flipped = (first.argmax(1) != second.argmax(1)).float().mean().item()
        status = "fail" if flipped > 0 or relative > 1e-3 else "warn" if relative > 1e-5 else "pass"
        return CheckResult(status, relative, 1e-5,
                           f"largest relative change of the logits between two identical passes {relative:.2g}; "
                           f"{flipped:.1%} of the predictions changed",
                           {"relative_change": relative, "predictions_changed": flipped})


@register_check("gradients_nonzero")
class GradientsNonzero(Check):
    """Input gradients exist and are not zero (Athalye et al. 2018, shattered gradients; Carlini et
    al. 2019). Measures the fraction of correctly classified samples whose cross-entropy input
    gradient is exactly zero (quantization, saturated softmax) and, as evidence, the same for the
    C&W margin loss (zero there too: no gradient at all; non-zero: use margin/DLR-loss attacks).
    Warns above 1%, fails above 10%."""

    stage = "pre"

    def run(self, ctx):
        x = ctx.x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = ctx.model(x)
            ce_grad, = torch.autograd.grad(F.cross_entropy(logits, ctx.y, reduction="sum"), x,
                                           retain_graph=True)
            margin_grad, = torch.autograd.grad(margin_loss(logits, ctx.y).sum(), x, allow_unused=True)
        correct = (logits.argmax(1) == ctx.y).detach()
        if not correct.any():
            return not_run("no sample is classified correctly")
        zero_ce = (ce_grad.flatten(1).abs().amax(1) == 0)[correct].float().mean().item()
        zero_margin = 1.0 if margin_grad is None else (margin_grad.flatten(1).abs().amax(1) == 0)[correct].float().mean().item()
        status = "fail" if zero_ce > 0.10 else "warn" if zero_ce > 0.01 else "pass"
        return CheckResult(status, zero_ce, 0.01,
                           f"{zero_ce:.1%} of the correctly classified samples have a zero cross-entropy input "
                           f"gradient ({zero_margin:.1%} a zero margin-loss gradient)",
                           {"zero_ce": zero_ce, "zero_margin": zero_margin, "n": int(correct.sum())})
