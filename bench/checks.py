"""The registered sanity checks (framework in bench.sanity). Sources: Athalye, Carlini & Wagner
2018 (obfuscated gradients), Carlini et al. 2019 (on evaluating adversarial robustness),
Croce & Hein 2020 (AutoAttack's flags), Pintor et al. 2022 (indicators of attack failure),
Vivek & Babu 2020 (single-step gradient masking), and the sanity tests of the seed papers.

Ordering checks ("A is at least as strong as B") measure the violation as the paired accuracy
difference acc(A) − acc(B) over the samples both cover; see `grade` for the rule.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

from attacks.pgd import margin_loss
from bench.sanity import (Check, CheckContext, CheckResult, Record, grade, mean_difference, not_run, paired,
                          paired_difference, register_check, wilson)

ORDER_MARGIN = 0.01   # one point of accuracy: what an ordering violation may reach by attack noise alone
GAP_WARN, GAP_FAIL = 0.10, 0.20


def _ordering(name_a: str, a: Record | list[Record], name_b: str, b: Record, what: str,
              margin: float = ORDER_MARGIN) -> CheckResult:
    """`a` (one record, or several ANDed per sample) should be at least as strong as `b`:
    violation = acc(a) − acc(b) on common samples."""
    group = a if isinstance(a, list) else [a]
    pairs = paired(*group, b)
    a_correct = np.logical_and.reduce([c for c, _ in pairs[:-1]])
    b_correct = pairs[-1][0]
    diff, lower, upper = paired_difference(a_correct, b_correct)
    status = grade(diff, lower, margin, margin)
    only_b = np.nonzero(a_correct & ~b_correct)[0]
    common = reduce(np.intersect1d, [r.index for r in group + [b]])
    return CheckResult(status, diff, margin,
                       f"{what}: accuracy {name_a} {a_correct.mean():.1%} vs {name_b} {b_correct.mean():.1%} "
                       f"(difference {diff:+.1%}, 95% CI [{lower:+.1%}, {upper:+.1%}], n={len(a_correct)})",
                       {"a": name_a, "b": name_b, "n": len(a_correct), "ci": [lower, upper],
                        "broken_only_by_b": int(len(only_b)), "examples": common[only_b[:10]].tolist()})


def _strongest_pgd(ctx: CheckContext) -> Record | None:
    """The suite's cross-entropy PGD with the most steps, or the eps-curve PGD at the threat eps."""
    pgds = [r for r in ctx.attacks if r.attack == "pgd"]
    if pgds:
        return min(pgds, key=lambda r: (r.accuracy, -r.evaluation_id))
    return ctx.curve_point("eps:pgd", ctx.threat.eps)


def _white_box(ctx: CheckContext) -> list[Record]:
    return ctx.attacks_of("gradient")


# ----------------------------------------------------------------------------- pre-checks: the model alone

@register_check("logits_not_probabilities")
class LogitsNotProbabilities(Check):
    """The model returns logits, not softmax probabilities (Carlini et al. 2019, §4.2): on
    probabilities, cross-entropy gradients saturate and CE attacks fail. Fails when more than half
    of the outputs are probability vectors (entries in [0, 1], summing to 1 within 1e-3)."""

    stage = "pre"

    def run(self, ctx):
        with torch.no_grad():
            out = ctx.model(ctx.samples.x).float()
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
            first, second = ctx.model(ctx.samples.x), ctx.model(ctx.samples.x)
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
        x = ctx.samples.x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = ctx.model(x)
            ce_grad, = torch.autograd.grad(F.cross_entropy(logits, ctx.samples.y, reduction="sum"), x,
                                           retain_graph=True)
            margin_grad, = torch.autograd.grad(margin_loss(logits, ctx.samples.y).sum(), x, allow_unused=True)
        correct = (logits.argmax(1) == ctx.samples.y).detach()
        if not correct.any():
            return not_run("no sample is classified correctly")
        zero_ce = (ce_grad.flatten(1).abs().amax(1) == 0)[correct].float().mean().item()
        zero_margin = 1.0 if margin_grad is None else (margin_grad.flatten(1).abs().amax(1) == 0)[correct].float().mean().item()
        status = "fail" if zero_ce > 0.10 else "warn" if zero_ce > 0.01 else "pass"
        return CheckResult(status, zero_ce, 0.01,
                           f"{zero_ce:.1%} of the correctly classified samples have a zero cross-entropy input "
                           f"gradient ({zero_margin:.1%} a zero margin-loss gradient)",
                           {"zero_ce": zero_ce, "zero_margin": zero_margin, "n": int(correct.sum())})


# ----------------------------------------------------------------------------- post-checks: the attacks

@register_check("iterative_beats_single_step")
class IterativeBeatsSingleStep(Check):
    """Iterative attacks are at least as strong as single-step ones, per sample (Carlini et al.
    2019, §5.2; Athalye et al. 2018): PGD must break what FGSM breaks. FGSM and PGD from the
    suite, else the eps curves' points at the threat eps."""

    def run(self, ctx):
        fgsm = next((r for r in ctx.attacks if r.attack == "fgsm"), None) or ctx.curve_point("eps:fgsm", ctx.threat.eps)
        pgd = _strongest_pgd(ctx)
        if fgsm is None or pgd is None:
            return not_run("needs FGSM and PGD at the threat eps (in the suite or the eps curves)")
        return _ordering(pgd.label, pgd, fgsm.label, fgsm, "PGD vs FGSM")


@register_check("white_box_beats_black_box")
class WhiteBoxBeatsBlackBox(Check):
    """White-box attacks are at least as strong as black-box ones (Athalye et al. 2018, §3.1;
    Carlini et al. 2019): a transfer, score-based (Square) or decision-based (RayS) attack that
    breaks samples every gradient attack misses means the gradients are masked. Compares the
    per-sample AND of the gradient attacks with the strongest black-box attack."""

    def run(self, ctx):
        white, black = _white_box(ctx), ctx.attacks_of("transfer", "score", "decision")
        if not white or not black:
            return not_run("needs gradient attacks and a black-box attack (transfer, square, rays) in the suite")
        results = [_ordering("white-box", white, b.label, b, f"white-box worst case vs {b.label}") for b in black]
        return max(results, key=lambda r: r.value)


@register_check("noise_weaker_than_gradient")
class NoiseWeakerThanGradient(Check):
    """Random noise is weaker than gradient attacks (Carlini et al. 2019, §5.2): a sample that
    random points in the ball break but no gradient attack does betrays useless gradients."""

    def run(self, ctx):
        white, noise = _white_box(ctx), ctx.attacks_of("noise")
        if not white or not noise:
            return not_run("needs gradient attacks and the `noise` attack in the suite")
        return _ordering("white-box", white, noise[0].label, noise[0], "white-box worst case vs random noise")


@register_check("autoattack_vs_pgd")
class AutoAttackVsPGD(Check):
    """AutoAttack is not far below PGD (Croce & Hein 2020, §5): a large gap means the PGD numbers
    came from a loss surface that fools PGD (masked gradients), not from robustness. Value:
    acc(PGD) − acc(AutoAttack), paired; warns when significantly above 10 points, fails when above
    20 with 95% confidence. Why not the few points of the paper's CIFAR tables: on small models
    APGD is a much better optimizer than fixed-step PGD even without masking (measured: PGD-trained
    tiny CNN on the synthetic set 8.6 points, PGD-AT/TRADES/MART on digits 6–9 points), while the
    masked models measured here reach 48 (quantized input) and the masked defenses of the paper
    tens of points."""

    def run(self, ctx):
        aa, pgd = next((r for r in ctx.attacks if r.attack == "autoattack"), None), _strongest_pgd(ctx)
        if aa is None or pgd is None:
            return not_run("needs `autoattack` and PGD in the suite")
        (a, _), (p, _) = paired(aa, pgd)
        diff, lower, upper = paired_difference(p, a)
        return CheckResult(grade(diff, lower, GAP_WARN, GAP_FAIL), diff, GAP_WARN,
                           f"PGD {p.mean():.1%} vs AutoAttack {a.mean():.1%} (gap {diff:+.1%}, 95% CI "
                           f"[{lower:+.1%}, {upper:+.1%}], n={len(a)})",
                           {"pgd": pgd.label, "n": len(a), "ci": [lower, upper], "fail_above": GAP_FAIL})


@register_check("silent_success")
class SilentSuccess(Check):
    """Silent success (Pintor et al. 2022): an intermediate iterate fooled the model but the point
    the attack returned does not, so the attack's accuracy overstates robustness by that fraction.
    Worst attack of the suite; warns above 1% of the samples, fails above 5%."""

    def run(self, ctx):
        traced = [r for r in ctx.attacks if "silent_success" in r.diagnostics]
        if not traced:
            return not_run("no attack of the suite records its iterates")
        worst = max(traced, key=lambda r: r.diagnostics["silent_success"] / max(len(r.correct), 1))
        count = worst.diagnostics["silent_success"]
        fraction = count / max(len(worst.correct), 1)
        status = "fail" if fraction > 0.05 else "warn" if fraction > 0.01 else "pass"
        return CheckResult(status, fraction, 0.01,
                           f"{worst.label}: {count} of {len(worst.correct)} samples were fooled by an iterate but not "
                           "by the returned point" + (" (an attack returning its best iterate, e.g. APGD, avoids this)"
                                                      if count else ""),
                           {"attack": worst.label, "count": count,
                            "examples": worst.diagnostics.get("silent_success_indices", [])[:10],
                            "per_attack": {r.label: r.diagnostics["silent_success"] for r in traced}})


# ----------------------------------------------------------------------------- post-checks: the curves

def _curve(ctx: CheckContext, name: str) -> list[tuple[float, Record]] | None:
    points = ctx.curves.get(name)
    return points if points and len(points) >= 2 else None


@register_check("large_eps_accuracy")
class LargeEpsAccuracy(Check):
    """Accuracy reaches chance or less at large eps (Carlini et al. 2019, §5.2; Athalye et al.):
    PGD accuracy at the largest bounded eps of the grid (4× the threat eps, or less where that
    reaches the whole pixel cube). Fails when its 95% lower bound exceeds chance (1/classes)."""

    def run(self, ctx):
        points = _curve(ctx, "eps:pgd")
        if points is None:
            return not_run("needs the eps curves")
        bounded = [(x, r) for x, r in points if 0 < x < ctx.unbounded_eps]
        if not bounded:
            return not_run("the eps grid has no bounded eps above 0")
        eps, record = bounded[-1]
        k, n = int(record.correct.sum()), len(record.correct)
        lower, _ = wilson(k, n)
        chance = 1 / ctx.num_classes
        status = "fail" if lower > chance else "warn" if k / n > chance else "pass"
        return CheckResult(status, k / n, chance, f"PGD accuracy at eps {eps:g}: {k / n:.1%} (chance {chance:.1%}, n={n})",
                           {"eps": eps, "n": n, "ci": [lower, wilson(k, n)[1]]})


@register_check("unbounded_attack_succeeds")
class UnboundedAttackSucceeds(Check):
    """An unbounded attack succeeds on every sample (Carlini et al. 2019, §5.2): at an eps that
    covers the whole pixel cube any image is reachable, so PGD must fool the model everywhere.
    Warns for any survivor, fails above 1%."""

    def run(self, ctx):
        points = _curve(ctx, "eps:pgd")
        if points is None:
            return not_run("needs the eps curves")
        eps, record = points[-1]
        if eps < ctx.unbounded_eps:
            return not_run(f"the eps grid ends at {eps:g}, below the unbounded eps {ctx.unbounded_eps:g}")
        survivors = record.correct.mean()
        status = "fail" if survivors > 0.01 else "warn" if survivors > 0 else "pass"
        return CheckResult(status, float(survivors), 0.0,
                           f"{int(record.correct.sum())} of {len(record.correct)} samples survive PGD at eps {eps:g}",
                           {"eps": eps, "examples": record.index[record.correct][:10].tolist()})


def _worst_consecutive(points: list[tuple[float, Record]], value) -> tuple[float, float, float, float, float]:
    """(x1, x2, lower, estimate, upper) of the consecutive pair (x1 < x2) whose `value(r2, r1)` =
    (estimate, lower, upper) has the highest lower bound."""
    worst = None
    for (x1, r1), (x2, r2) in zip(points, points[1:]):
        est, lower, upper = value(r2, r1)
        if worst is None or lower > worst[2]:
            worst = (x1, x2, lower, est, upper)
    return worst


@register_check("monotone_in_eps")
class MonotoneInEps(Check):
    """Accuracy does not increase with eps (Carlini et al. 2019, §5.2): a larger ball contains the
    smaller one. Worst consecutive pair of the PGD eps curve, paired per sample, graded with a
    one-point margin (see `grade`)."""

    def run(self, ctx):
        points = _curve(ctx, "eps:pgd")
        if points is None:
            return not_run("needs the eps curves")

        def rise(later, earlier):
            (b, _), (a, _) = paired(later, earlier)
            return paired_difference(b, a)

        x1, x2, lower, est, upper = _worst_consecutive(points, rise)
        return CheckResult(grade(est, lower, ORDER_MARGIN, ORDER_MARGIN), est, ORDER_MARGIN,
                           f"largest accuracy rise with eps: {est:+.1%} from eps {x1:g} to {x2:g} "
                           f"(95% CI [{lower:+.1%}, {upper:+.1%}])", {"from": x1, "to": x2, "ci": [lower, upper]})


class _LossMonotone(Check):
    curve: str

    def run(self, ctx):
        points = _curve(ctx, self.curve)
        if points is None:
            return not_run("needs the eps curves")
        points = [(x, r) for x, r in points if x <= self.up_to(ctx)]
        if len(points) < 2:
            return not_run("the eps grid has fewer than two points in range")

        def fall(later, earlier):
            (_, lb), (_, la) = paired(later, earlier)
            return mean_difference(la, lb)  # how much the loss falls from the earlier eps to the later

        x1, x2, lower, est, upper = _worst_consecutive(points, fall)
        attack = self.curve.split(":")[1].upper()
        return CheckResult("fail" if lower > 0 else "pass", est, 0.0,
                           f"mean {attack} loss up to eps {points[-1][0]:g}: "
                           + (f"falls by {est:.3g} from eps {x1:g} to {x2:g}" if est > 0 else
                              f"rises at every step (least: {-est:.3g} from eps {x1:g} to {x2:g})")
                           + f" (95% CI of the fall [{lower:.3g}, {upper:.3g}])",
                           {"from": x1, "to": x2, "ci": [lower, upper],
                            "mean_loss": {f"{x:g}": r.mean_loss for x, r in points}})

    def up_to(self, ctx) -> float:
        return ctx.unbounded_eps


@register_check("pgd_loss_monotone_in_eps")
class PGDLossMonotoneInEps(_LossMonotone):
    """The mean cross-entropy PGD reaches does not fall as eps grows (Carlini et al. 2019): the
    larger ball contains the smaller one's maximizer. Fails when it falls with 95% confidence
    between consecutive eps of the grid."""

    curve = "eps:pgd"


@register_check("fgsm_loss_monotone_in_eps")
class FGSMLossMonotoneInEps(_LossMonotone):
    """The mean cross-entropy at FGSM points does not fall as eps grows, up to twice the threat
    eps (Vivek & Babu 2020, single-step gradient masking: on a masked model the one-step linear
    approximation fails, and the FGSM loss drops at larger eps). Fails on a fall with 95% confidence."""

    curve = "eps:fgsm"

    def up_to(self, ctx) -> float:
        return 2 * ctx.threat.eps


@register_check("fgsm_pgd_loss_gap")
class FGSMPGDLossGap(Check):
    """The single-step loss is not far below the multi-step loss (Vivek & Babu 2020): the share of
    PGD's loss increase over clean that FGSM achieves at the threat eps,
    (L_FGSM − L_clean) / (L_PGD − L_clean). A masked single-step model reaches a tiny share."""

    def run(self, ctx):
        fgsm, pgd = ctx.curve_point("eps:fgsm", ctx.threat.eps), ctx.curve_point("eps:pgd", ctx.threat.eps)
        clean = ctx.curve_point("eps:pgd", 0.0)
        if fgsm is None or pgd is None or clean is None:
            return not_run("needs the eps curves at the threat eps")
        rise_pgd = pgd.mean_loss - clean.mean_loss
        if not rise_pgd > 0:
            return not_run("PGD does not raise the loss above its clean value")
        share = (fgsm.mean_loss - clean.mean_loss) / rise_pgd
        status = "fail" if share < 0.1 else "warn" if share < 0.2 else "pass"
        return CheckResult(status, share, 0.2,
                           f"FGSM reaches {share:.0%} of PGD's loss increase at eps {ctx.threat.eps:g} (mean loss clean "
                           f"{clean.mean_loss:.3g}, FGSM {fgsm.mean_loss:.3g}, PGD {pgd.mean_loss:.3g})",
                           {"clean": clean.mean_loss, "fgsm": fgsm.mean_loss, "pgd": pgd.mean_loss, "fail_below": 0.1})


@register_check("steps_do_not_raise_accuracy")
class StepsDoNotRaiseAccuracy(Check):
    """More PGD steps do not raise accuracy (Carlini et al. 2019, §5.2): accuracy after the most
    steps of the steps curve against the lowest accuracy at fewer steps, paired per sample."""

    def run(self, ctx):
        points = _curve(ctx, "steps:pgd")
        if points is None:
            return not_run("needs the steps curve")
        (t_max, last), earlier = points[-1], points[:-1]
        t_best, best = min(earlier, key=lambda p: p[1].accuracy)
        return _ordering(f"PGD-{t_max:g}", last, f"PGD-{t_best:g}", best, "more steps vs fewer steps")


def _newly_broken(ctx: CheckContext, extra: Record, what: str, warn_above: float, fail_above: float,
                  evidence: dict) -> CheckResult:
    """How much `extra` lowers the suite's per-sample worst case (the AND over every attack of the
    suite, on the samples both cover): samples every suite attack left standing that it breaks."""
    suite = [r for r in ctx.attacks] + ([ctx.clean] if ctx.clean is not None else [])
    pairs = paired(*suite, extra)
    worst = np.logical_and.reduce([c for c, _ in pairs[:-1]])
    both = worst & pairs[-1][0]
    diff, lower, upper = paired_difference(worst, both)
    status = grade(diff, lower, warn_above, fail_above)
    return CheckResult(status, diff, warn_above,
                       f"{what} breaks {int((worst & ~both).sum())} of the {int(worst.sum())} samples the suite's "
                       f"worst case left standing: worst case {worst.mean():.1%} → {both.mean():.1%} (n={len(worst)}, "
                       f"drop 95% CI [{lower:+.1%}, {upper:+.1%}])",
                       {**evidence, "n": len(worst), "ci": [lower, upper], "fail_above": fail_above})


@register_check("steps_converged")
class StepsConverged(Check):
    """The evaluation had converged in steps (Carlini et al. 2019, §5.2: more iterations must not
    change the result): PGD with the most steps of the steps curve (1,000 by default) barely lowers
    the suite's per-sample worst case; fails when it lowers it by more than one point with 95%
    confidence. Evidence: Pintor et al. 2022's incomplete-optimization indicator, the samples still
    robust at the end of that trajectory whose loss was still rising over its last 10% (a rising
    loss far from the boundary need not change any prediction, so it informs and does not grade)."""

    def run(self, ctx):
        points = _curve(ctx, "steps:pgd")
        if points is None:
            return not_run("needs the steps curve")
        t_max, last = points[-1]
        trace = last.diagnostics
        result = _newly_broken(ctx, last, f"PGD-{t_max:g}", ORDER_MARGIN, ORDER_MARGIN,
                               {"not_converged": trace.get("not_converged"), "robust_at_end": trace.get("robust_at_end"),
                                "rule": trace.get("convergence_rule"),
                                "examples": trace.get("not_converged_indices", [])[:10]})
        result.summary += (f"; loss still rising at the end for {trace.get('not_converged', 0)} of "
                           f"{trace.get('robust_at_end', 0)} robust samples")
        return result


@register_check("restarts_saturate")
class RestartsSaturate(Check):
    """The evaluation had converged in restarts (Carlini et al. 2019, §5.2; Mosbach et al. 2018):
    PGD with the most restarts of the restarts curve (10 by default) barely lowers the suite's
    per-sample worst case. (Restarts only add successes, so they cannot raise accuracy; a large
    drop means single-run numbers were unreliable, typical of a rugged, masked loss surface.)
    Fails when it lowers it by more than one point with 95% confidence."""

    def run(self, ctx):
        points = _curve(ctx, "restarts:pgd")
        if points is None:
            return not_run("needs the restarts curve")
        r_max, last = points[-1]
        return _newly_broken(ctx, last, f"PGD with {r_max:g} restarts", ORDER_MARGIN, ORDER_MARGIN,
                             {"accuracy": {f"{x:g}": r.accuracy for x, r in points}})
