"""Attack base class, the context its `prepare` gets, and the registry. Attacks live in the
`attacks` package, one file each."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from bench.core.config import build_config
from bench.core.data import Dataset
from bench.core.defense import DEFENSES
from bench.core.errors import BenchError
from bench.core.pretrained import PretrainedModels
from bench.core.registry import Registry
from bench.core.threat import BALL_TOLERANCE, NORMS, ThreatModel, check_eps, check_norm, perturbation_norms

KINDS = ("gradient", "score", "decision", "transfer", "noise")


@dataclass
class EvalContext:
    """What an attack's `prepare` may use: the dataset, the device and `pretrained` (other runs on
    the same data, trained on demand and cached; it has no training config of its own, so callers
    give `train`)."""

    data: Dataset
    device: torch.device
    pretrained: PretrainedModels


class Attack:
    """An attack: `attack(model, x, y) -> x_adv` with x in [0, 1].

    Subclasses define `Config`, a frozen dataclass whose defaults are the paper's (it must
    have `norm` and `eps` fields), and `perturb`. The model is in eval mode when called.

    Class attributes the evaluation and the sanity checks read:
    - `implementation`: whose code runs (ours, or a library with its version), and `revision`,
      bumped whenever the attack's results change for the same config: both are part of every
      evaluation's identity (`implementation_id`), so results of an older revision are recomputed.
      A composite attack names the registered attacks it runs in `parts` and the defenses whose
      runs it trains in `pretrained_defenses`: their revisions are part of its own (`revision_id`);
    - `kind`: "gradient" (white-box), "score" (black-box, sees logits), "decision" (black-box,
      sees labels only), "transfer" (black-box, gradients of a surrogate), "noise" (no search);
    - `iterative` (many steps of an optimizer), `single_step` (one gradient step, FGSM),
      `ensemble` (a cascade of other attacks, AutoAttack): the checks choose attacks by these;
    - `minimum_norm`: the attack looks for the smallest adversarial perturbation and returns it
      wherever it lies (or x where it found none); a sample counts as robust at eps when the
      returned point is classified correctly or lies farther than eps. Otherwise the returned
      point must lie in the eps ball;
    - `norms`: the norms it supports (others are refused with a clear error, plus `norm_hint`).

    Iterative attacks call `observe(logits, y, loss)` at each iterate they evaluate; the
    evaluation reads the record (`start_trace` / `pop_trace`) to find silent successes (an
    iterate fooled the model but the returned point does not) and to draw loss traces.
    An attack may also add JSON-able numbers to `self.stats` (accumulated over batches, e.g.
    AutoAttack's robust count after each component); the evaluation stores them.

    Randomness comes from the global torch RNG, which the evaluation seeds.
    """

    Config: ClassVar[type]
    implementation: ClassVar[str] = "atbench"
    revision: ClassVar[int] = 1
    parts: ClassVar[tuple[str, ...]] = ()
    pretrained_defenses: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "gradient"
    iterative: ClassVar[bool] = False
    single_step: ClassVar[bool] = False
    ensemble: ClassVar[bool] = False
    minimum_norm: ClassVar[bool] = False
    norms: ClassVar[tuple[str, ...]] = NORMS
    norm_hint: ClassVar[str] = ""
    name: ClassVar[str]

    def __init__(self, **params):
        self.config = build_config(self.Config, params, f"attack {self.name!r}")
        check_norm(self.config.norm)
        if self.config.norm not in self.norms:
            raise BenchError(f"attack {self.name!r} supports {' and '.join(self.norms)} only, got norm "
                             f"{self.config.norm!r}" + (f"; {self.norm_hint}" if self.norm_hint else ""))
        check_eps(self.config.eps, self.config.norm)
        self._trace: list[TraceStep] | None = None
        self.stats: dict = {}

    @classmethod
    def revision_id(cls) -> str:
        """The revision, with those of the attacks and defenses it is made of: "2", or
        "2(apgd_ce:1,fab:1)" for a composite."""
        parts = [f"{name}:{ATTACKS.get(name).revision_id()}" for name in cls.parts]
        parts += [f"defense {name}:{DEFENSES.get(name).revision_id()}" for name in cls.pretrained_defenses]
        return f"{cls.revision}" + (f"({','.join(parts)})" if parts else "")

    @property
    def implementation_id(self) -> str:
        return f"{self.implementation} r{self.revision_id()}"

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.config.norm, self.config.eps)

    def params(self) -> dict:
        return dataclasses.asdict(self.config)

    def prepare(self, ctx: EvalContext) -> None:
        """Obtain what the attack needs beyond the model (a surrogate, trained on demand) before
        the first batch. Default: nothing."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.perturb(model, x, y)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Default, for attacks that start from the clean prediction: one clean forward pass, then
        `attack_robust`. An attack defines `perturb` or `attack_robust`."""
        with torch.no_grad():
            logits = model(x)
        return self.attack_robust(model, x, y, logits)

    def attack_robust(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The attack given the clean `logits` of x (AutoAttack passes those it already has)."""
        raise NotImplementedError

    def accumulate(self, group: str | None = None, /, **counts) -> dict:
        """Add `counts` to the running totals in `stats` (in the dict `stats[group]` when a group is
        named), so that they sum over batches; returns the dict they were added to."""
        totals = self.stats if group is None else self.stats.setdefault(group, {})
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        return totals

    # ------------------------------------------------------------------ optimization trace

    def observe(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> None:
        """Record one iterate: which samples it misclassifies and (optionally) their losses.
        `index` gives the samples' positions in the attacked batch when the iterate covers only
        some of them (restarts on survivors, per-target runs). Free when no trace is recorded."""
        if self._trace is not None:
            fooled = logits.detach().argmax(1) != y
            self._trace.append(TraceStep(fooled, None if loss is None else loss.detach().float(), index))

    def observe_in_ball(self, logits: torch.Tensor, y: torch.Tensor, x_iter: torch.Tensor, x: torch.Tensor,
                        index: torch.Tensor | None = None) -> None:
        """`observe` for a minimum-norm attack: an iterate counts as fooling only inside the eps ball
        (one that fools the model farther out is no success at eps and is not a silent success)."""
        if self._trace is not None:
            inside = perturbation_norms(x_iter, x, self.config.norm) <= self.config.eps + BALL_TOLERANCE
            self.observe(logits, torch.where(inside, y, logits.argmax(1)), index=index)

    def start_trace(self) -> None:
        self._trace = []

    def pop_trace(self) -> list["TraceStep"]:
        trace, self._trace = self._trace or [], None
        return trace


@dataclasses.dataclass
class TraceStep:
    """One observed iterate: per-sample misclassification and loss; `index` None = the whole batch."""

    fooled: torch.Tensor
    loss: torch.Tensor | None
    index: torch.Tensor | None


ATTACKS: Registry[type[Attack]] = Registry("attack", base=Attack, plugins=("attacks",))
register_attack = ATTACKS.register
