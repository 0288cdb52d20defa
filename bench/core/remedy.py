"""Remedy contract: the adaptive attack that answers a flagged sanity check (Tramèr, Carlini,
Brendel & Mądry 2020, "On Adaptive Attacks to Adversarial Example Defenses"; Athalye, Carlini &
Wagner 2018, "Obfuscated Gradients Give a False Sense of Security"). A flag is a question, the
remedy its answer: EOT for randomness, logit recovery for saturated outputs, BPDA for shattered
gradients, stronger black-box and transfer attacks for misleading ones. The remedies live in
`bench.remedies`; the engine runs them after the checks (`bench.engine.adaptive`).

A remedy names the checks it `answers` and its `paper`, says whether it `applies` to a model, and
gives the registered attacks it runs, each on its `view` of the model: the model as the adaptive
attack differentiates it (logits recovered from probabilities, a straight-through estimator in
place of a declared preprocessing, a distilled surrogate in the backward pass). The verdict on
every adaptive point is the model's own: the evaluation classifies it with the model, as for any
attack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from bench.core.attack import ATTACKS, Attack
from bench.core.check import CheckResult
from bench.core.config import build_config, require
from bench.core.data import Dataset
from bench.core.registry import Registry
from bench.core.threat import ThreatModel

ATTACK_FAILURES = ("iterative_beats_single_step", "white_box_beats_black_box", "noise_weaker_than_gradient",
                   "autoattack_vs_pgd", "large_eps_accuracy", "unbounded_attack_succeeds")
# the checks that flag an attack failing where a stronger one would not: every remedy answers them
PROBABILITY_TOLERANCE = 1e-3  # a row of outputs in [0, 1] summing to 1 within this is a probability vector
TINY = 1e-30                  # log(p) floor for probabilities that underflowed to zero
LOGIT_STD_CAP = 10.0          # rows of logits spread wider than this are scaled down to it (`recover_logits`)


@dataclass
class RemedyContext:
    """What a remedy reads: the model in eval mode, the evaluation samples, the dataset (shapes,
    normalization), the threat model, the flagged checks (name → result) that triggered the stage,
    the seed, and `cache`, shared by the remedies of one checkpoint (a surrogate distilled once)."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    data: Dataset
    threat: ThreatModel
    device: torch.device
    seed: int
    flags: dict[str, CheckResult]
    cache: dict = field(default_factory=dict)


class Remedy:
    """An adaptive evaluation that answers flagged checks. Class attributes:

    - `answers`: the checks whose failure (or warning) calls for it; `title`: a short name
      ("BPDA surrogate"); `paper`: where the technique comes from;
    - `order`: the engine tries a flag's remedies cheapest first and stops at the first whose
      results make the re-run check pass;
    - `revision`, bumped when its results can change: part of its evaluations' identity.

    `Config` (a frozen dataclass, validated in `__post_init__`) holds the budgets; suites override
    them. Subclasses define `attacks` and, where they attack something else than the model, `view`
    (and `recheck` where re-running a check cannot tell whether the remedy answered it).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str]
    answers: ClassVar[tuple[str, ...]]
    order: ClassVar[int]
    revision: ClassVar[int] = 1
    Config: ClassVar[type]

    def __init__(self, **params):
        self.config = build_config(self.Config, params, f"remedy {self.name!r}")

    def params(self) -> dict:
        return dataclasses.asdict(self.config)

    def applies(self, ctx: RemedyContext) -> str | None:
        """None when the remedy applies to this model, else why not (one line). Default: always."""
        return None

    def attacks(self, ctx: RemedyContext) -> list[tuple[str, Attack]]:
        """The adaptive attacks, as (label, registered attack configured at the threat model)."""
        raise NotImplementedError

    def view(self, model: nn.Module, ctx: RemedyContext) -> nn.Module:
        """The model as the adaptive attacks see it, which the re-run checks of the model alone read
        too. Default: the model itself."""
        return model

    def recheck(self, check: str, ctx: RemedyContext) -> CheckResult | None:
        """The remedy's own answer to a check it answers, where re-running the check on the new
        results cannot give it (EOT: the check of randomness); None: re-run the check."""
        return None


REMEDIES: Registry[type[Remedy]] = Registry("remedy", base=Remedy, plugins=("bench.remedies",))
register_remedy = REMEDIES.register


class AdaptiveAttack(Attack):
    """A registered attack that a remedy runs on its view of the model. Its identity holds the
    attack's parameters and implementation and the remedy's name, parameters and revision; the
    evaluation classifies the returned points with the model itself. In the re-run checks an
    adaptive attack counts as a white-box iterative attack (it is the white-box evaluation done
    right, whatever it queries)."""

    iterative = True

    def __init__(self, remedy: Remedy, ctx: RemedyContext, attack: Attack):
        self.remedy, self.ctx, self.attack = remedy, ctx, attack
        self.config, self.minimum_norm, self.name = attack.config, attack.minimum_norm, attack.name
        self._trace, self.stats = None, attack.stats

    def params(self) -> dict:
        return {"attack": self.attack.params(), "remedy": self.remedy.name, "remedy_params": self.remedy.params()}

    @property
    def implementation_id(self) -> str:
        return f"{self.attack.implementation_id}; remedy {self.remedy.name} r{self.remedy.revision}"

    def prepare(self, ctx) -> None:
        self.attack.prepare(ctx)

    def perturb(self, model, x, y):
        return self.attack(self.remedy.view(model, self.ctx), x, y)


@dataclass(frozen=True)
class APGDBudget:
    """A remedy's budget for APGD-CE and APGD-T (AutoAttack's defaults: 100 steps, 1 restart, 9
    target classes); remedies with more settings subclass it."""

    steps: int = 100
    restarts: int = 1
    n_target_classes: int = 9

    def __post_init__(self):
        require(self, at_least_one=("steps", "restarts", "n_target_classes"))

    def apgd_ce_and_t(self, ctx: RemedyContext) -> list[tuple[str, Attack]]:
        return apgd_pair(ctx, "apgd_t", steps=self.steps, restarts=self.restarts, n_target_classes=self.n_target_classes)


def apgd_pair(ctx: RemedyContext, second: str, **params) -> list[tuple[str, Attack]]:
    """APGD-CE and a second APGD (`apgd_t`: targeted DLR, `apgd_dlr`: DLR) at the threat model with
    `params`, the second only where the model has the classes its loss needs (`n_target_classes`
    goes to APGD-T only)."""
    ball = dict(norm=ctx.threat.norm, eps=ctx.threat.eps)
    targets = params.pop("n_target_classes", None)
    out = [("apgd_ce", ATTACKS.get("apgd_ce")(**ball, **params))]
    if ctx.data.num_classes >= ATTACKS.get(second).min_classes:
        extra = {"n_target_classes": targets} if second == "apgd_t" else {}
        out.append((second, ATTACKS.get(second)(**ball, **params, **extra)))
    return out


# ----------------------------------------------------------------------------- views the remedies share

def forward_backward(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Exactly `value` in the forward pass, differentiated as `surrogate` in the backward pass (the
    BPDA composition). The zero (surrogate − surrogate) is formed first: value + s − s would round."""
    return value.detach() + (surrogate - surrogate.detach())


def probability_rows(out: torch.Tensor) -> torch.Tensor:
    """Per row: is it a probability vector (entries in [0, 1], summing to 1)?"""
    return ((out >= 0) & (out <= 1)).all(1) & ((out.sum(1) - 1).abs() <= PROBABILITY_TOLERANCE)


def recover_logits(out: torch.Tensor) -> torch.Tensor:
    """Logits from what a model returns (Carlini & Wagner 2017 §8; Carlini et al. 2019 §4.2):
    the log of rows that are probability vectors, then each row whose standard deviation exceeds
    `LOGIT_STD_CAP` scaled down to it (the factor held constant in the backward pass), so that
    neither a softmax nor a huge scale saturates the cross-entropy. Ordinary logits pass unchanged:
    the cross-entropy an adaptive attack maximizes is then the model's own. (Dividing every row by
    its standard deviation, as remedies' revision 1 did, is a per-sample temperature that weakened
    APGD-CE: 64.5% against 56.5% on the shattered digits model.) The predicted class is unchanged."""
    out = torch.where(probability_rows(out)[:, None], out.clamp_min(TINY).log(), out)
    return out / (out.std(1, keepdim=True).detach() / LOGIT_STD_CAP).clamp_min(1.0)


class RecoveredLogits(nn.Module):
    """The model with `recover_logits` on its outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return recover_logits(self.model(x))
