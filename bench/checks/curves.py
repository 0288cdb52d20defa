"""Post-checks on the stored curves: accuracy and loss against eps, steps and restarts."""

from __future__ import annotations

from bench.core.check import (ORDER_MARGIN, Check, CheckResult, Record, curve, newly_broken, not_run, ordering, paired,
                              register_check)
from bench.core.stats import grade, mean_difference, paired_difference, wilson


@register_check("large_eps_accuracy")
class LargeEpsAccuracy(Check):
    """Accuracy reaches chance or less at large eps (Carlini et al. 2019, §5.2; Athalye et al.):
    PGD accuracy at the largest bounded eps of the grid (4× the threat eps, or less where that
    reaches the whole pixel cube). Fails when its 95% lower bound exceeds chance (1/classes)."""

    def run(self, ctx):
        points = curve(ctx, "eps:pgd")
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
        points = curve(ctx, "eps:pgd")
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


def _worst_consecutive(points: list[tuple[float, Record]], value) -> tuple[float, float, float, float, float] | None:
    """(x1, x2, lower, estimate, upper) of the consecutive pair (x1 < x2) whose `value(r2, r1)` =
    (estimate, lower, upper) has the highest lower bound; pairs valued NaN (nothing to compare)
    are skipped, and None is returned when every pair is."""
    worst = None
    for (x1, r1), (x2, r2) in zip(points, points[1:]):
        est, lower, upper = value(r2, r1)
        if est != est:
            continue
        if worst is None or lower > worst[2]:
            worst = (x1, x2, lower, est, upper)
    return worst


@register_check("monotone_in_eps")
class MonotoneInEps(Check):
    """Accuracy does not increase with eps (Carlini et al. 2019, §5.2): a larger ball contains the
    smaller one. Worst consecutive pair of the PGD eps curve, paired per sample, graded with a
    one-point margin (see `grade`)."""

    def run(self, ctx):
        points = curve(ctx, "eps:pgd")
        if points is None:
            return not_run("needs the eps curves")

        def rise(later, earlier):
            (b, _), (a, _) = paired(later, earlier)
            return paired_difference(b, a)

        worst = _worst_consecutive(points, rise)
        if worst is None:
            return not_run("the eps curve has fewer than two points")
        x1, x2, lower, est, upper = worst
        return CheckResult(grade(est, lower, ORDER_MARGIN, ORDER_MARGIN), est, ORDER_MARGIN,
                           f"largest accuracy rise with eps: {est:+.1%} from eps {x1:g} to {x2:g} "
                           f"(95% CI [{lower:+.1%}, {upper:+.1%}])", {"from": x1, "to": x2, "ci": [lower, upper]})


class _LossMonotone(Check):
    """Consecutive eps of one curve compared on the samples the attack has not fooled at the
    smaller eps: a sample already misclassified there is an adversarial example found, and how
    much higher its loss climbs in a larger ball says nothing about whether the attack can find
    them (at a box-sized eps, PGD's larger steps can settle lower on samples fooled long before:
    an honest TRADES model on MNIST, every sample fooled from eps 0.45, fell from 8.61 at eps 0.9 to
    8.22 at eps 1). A pair with no such sample is skipped."""

    curve: str

    def run(self, ctx):
        points = curve(ctx, self.curve)
        if points is None:
            return not_run("needs the eps curves")
        points = [(x, r) for x, r in points if x <= self.up_to(ctx)]
        if len(points) < 2:
            return not_run("the eps grid has fewer than two points in range")

        def fall(later, earlier):
            (_, lb), (ca, la) = paired(later, earlier)
            return mean_difference(la[ca], lb[ca])  # how much the loss falls, on samples not fooled earlier

        worst = _worst_consecutive(points, fall)
        if worst is None:
            return not_run("no sample survives the attack at any eps but the largest: nothing to compare")
        x1, x2, lower, est, upper = worst
        attack = self.curve.split(":")[1].upper()
        return CheckResult("fail" if lower > 0 else "pass", est, 0.0,
                           f"mean {attack} loss up to eps {points[-1][0]:g}, on samples not fooled at the smaller eps: "
                           + (f"falls by {est:.3g} from eps {x1:g} to {x2:g}" if est > 0 else
                              f"rises at every step (least: {-est:.3g} from eps {x1:g} to {x2:g})")
                           + f" (95% CI of the fall [{lower:.3g}, {upper:.3g}])",
                           {"from": x1, "to": x2, "ci": [lower, upper],
                            "mean_loss": {f"{x:g}": r.mean_loss for x, r in points},
                            "not_fooled": {f"{x:g}": int(r.correct.sum()) for x, r in points}})

    def up_to(self, ctx) -> float:
        return ctx.unbounded_eps


@register_check("pgd_loss_monotone_in_eps")
class PGDLossMonotoneInEps(_LossMonotone):
    """The mean cross-entropy PGD reaches does not fall as eps grows (Carlini et al. 2019): the
    larger ball contains the smaller one's maximizer. Fails when it falls with 95% confidence
    between consecutive eps of the grid, on the samples PGD has not fooled at the smaller one.
    Revision 2: compared on those samples only (revision 1 took every sample, see `_LossMonotone`)."""

    revision = 2
    curve = "eps:pgd"


@register_check("fgsm_loss_monotone_in_eps")
class FGSMLossMonotoneInEps(_LossMonotone):
    """The mean cross-entropy at FGSM points does not fall as eps grows, up to twice the threat
    eps (Vivek & Babu 2020, single-step gradient masking: on a masked model the one-step linear
    approximation fails, and the FGSM loss drops at larger eps). Fails on a fall with 95% confidence,
    on the samples FGSM has not fooled at the smaller eps (revision 2; see `_LossMonotone`)."""

    revision = 2
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
        points = curve(ctx, "steps:pgd")
        if points is None:
            return not_run("needs the steps curve")
        (t_max, last), earlier = points[-1], points[:-1]
        t_best, best = min(earlier, key=lambda p: p[1].accuracy)
        return ordering(f"PGD-{t_max:g}", last, f"PGD-{t_best:g}", best, "more steps vs fewer steps")


@register_check("steps_converged")
class StepsConverged(Check):
    """The evaluation had converged in steps (Carlini et al. 2019, §5.2: more iterations must not
    change the result): PGD with the most steps of the steps curve (1,000 by default) barely lowers
    the suite's per-sample worst case; fails when it lowers it by more than one point with 95%
    confidence. Evidence: Pintor et al. 2022's incomplete-optimization indicator, the samples still
    robust at the end of that trajectory whose loss was still rising over its last 10% (a rising
    loss far from the boundary need not change any prediction, so it informs and does not grade)."""

    def run(self, ctx):
        points = curve(ctx, "steps:pgd")
        if points is None:
            return not_run("needs the steps curve")
        t_max, last = points[-1]
        trace = last.diagnostics
        result = newly_broken(ctx, last, f"PGD-{t_max:g}", ORDER_MARGIN, ORDER_MARGIN,
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
        points = curve(ctx, "restarts:pgd")
        if points is None:
            return not_run("needs the restarts curve")
        r_max, last = points[-1]
        return newly_broken(ctx, last, f"PGD with {r_max:g} restarts", ORDER_MARGIN, ORDER_MARGIN,
                             {"accuracy": {f"{x:g}": r.accuracy for x, r in points}})
