"""Pre-checks: what the model alone shows, before any attack (logits, determinism, gradients)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.adversary.losses import margin_loss
from bench.core.check import Check, CheckResult, not_run, register_check
from bench.core.randomness import EXACT, PASSES, output_changes


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
    """Outputs are deterministic in eval mode (Athalye et al. 2018, §4.3 randomized defenses):
    8 forward passes of the same inputs, each cut into 1, 2, 4 or 8 batches (30 forward calls),
    compared sample by sample with the first (`bench.core.randomness`). Randomness defeats gradient
    attacks without robustness; evaluate such a model with EOT (remedy `eot`, AutoAttack's version
    "rand"). The evaluator judges such a model's points by the plurality of several draws.

    Fails when a logit moves by more than 1e-3 of the largest logit between passes, or a
    prediction changes with a move above 1e-5; warns when two passes batched alike differ by more
    than 1e-5 (identical computations should agree to the bit). A change between different
    batchings below 1e-3 is not counted: kernels chosen per batch size round differently.
    Evidence: per sample (which samples changed) and per batch (which forward calls changed).

    How likely a miss is: randomness drawn per sample shows on every call. Randomness drawn once
    per forward call (per batch) passes only if all 30 calls make the same draw: probability
    Σ_k p_k^30 ≤ p^29, p the probability of the most likely draw (an atom such as "no noise this
    time"). For the planted `batch_random` (noise on one call in three) that is (2/3)^30 ≈ 5e-6,
    where the two passes of this check's first revision missed it with probability 4/9; a draw
    that is "no change" with probability 0.9 is still missed with probability 0.9^30 ≈ 0.04."""

    stage = "pre"
    revision = 2  # 2: 8 passes in 1-8 batches, per-sample and per-batch evidence (1: two identical passes)

    def run(self, ctx):
        changes = output_changes(ctx.model, ctx.x)
        changed_samples, flipped, calls = changes.samples, changes.flipped, changes.calls
        relative, exact = changes.relative, changes.exact
        fraction = changed_samples.float().mean().item()
        status = "fail" if changes.random else "warn" if exact > EXACT else "pass"
        return CheckResult(status, relative, EXACT,
                           f"{PASSES} passes ({len(calls)} forward calls): largest relative change of the logits "
                           f"{relative:.2g}; {fraction:.1%} of the samples changed (prediction: "
                           f"{flipped.float().mean().item():.1%}), in {sum(calls)} of {len(calls)} calls",
                           {"relative_change": relative, "identical_passes_change": exact,
                            "samples_changed": fraction, "predictions_changed": flipped.float().mean().item(),
                            "calls": len(calls), "calls_changed": int(sum(calls)),
                            "examples": changed_samples.nonzero().flatten()[:10].tolist()})


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
