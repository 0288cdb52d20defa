"""Score- and decision-based attacks with larger budgets: the answers to misleading gradients
that need no gradient at all."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.attack import ATTACKS
from bench.core.config import require
from bench.core.remedy import ATTACK_FAILURES, Remedy, register_remedy


@register_remedy("square")
class SquareRestarts(Remedy):
    """Square Attack with a larger budget and restarts (Andriushchenko et al. 2020; Tramèr et al.
    2020, §4: a gradient-free attack is the first answer to gradients that mislead; Croce & Hein
    2020 use it in AutoAttack for this reason): the margin loss on the model's outputs, `queries`
    per restart, `restarts` runs, each on the samples no earlier run fooled. Defaults: the paper's
    10,000 queries, 3 restarts, p_init 0.8 with the schedule rescaled to the budget."""

    title = "Square, larger budget"
    paper = "Andriushchenko et al. 2020; Tramèr et al. 2020 §4"
    answers = ATTACK_FAILURES
    order = 7

    @dataclass(frozen=True)
    class Config:
        queries: int = 10000
        restarts: int = 3
        p_init: float = 0.8

        def __post_init__(self):
            require(self, at_least_one=("queries", "restarts"), positive=("p_init",), fraction=("p_init",))

    def applies(self, ctx):
        return None if len(ctx.data.input_shape) == 3 else "Square needs images"

    def attacks(self, ctx):
        c = self.config
        return [("square", ATTACKS.get("square")(norm=ctx.threat.norm, eps=ctx.threat.eps, queries=c.queries,
                                                 restarts=c.restarts, p_init=c.p_init))]


@register_remedy("rays")
class RaySLargerBudget(Remedy):
    """RayS with its paper's budget (Chen & Gu 2020: 40,000 queries for robust models), stopping
    a sample once its boundary distance is within eps (only accuracy at eps is asked for): labels
    only, so no output or gradient obfuscation reaches it. L∞ only, as the paper."""

    title = "RayS, larger budget"
    paper = "Chen & Gu 2020"
    answers = ATTACK_FAILURES
    order = 8

    @dataclass(frozen=True)
    class Config:
        queries: int = 40000

        def __post_init__(self):
            require(self, at_least_one=("queries",))

    def applies(self, ctx):
        return None if ctx.threat.norm == "Linf" else "RayS is an L∞ attack"

    def attacks(self, ctx):
        return [("rays", ATTACKS.get("rays")(norm=ctx.threat.norm, eps=ctx.threat.eps, queries=self.config.queries,
                                             early_stop=True))]
