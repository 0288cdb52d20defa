"""Black-box transfer attack: PGD adversarial examples of a surrogate model, evaluated on the target."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.core.attack import ATTACKS, Attack, register_attack
from bench.core.config import require
from bench.core.errors import BenchError


@register_attack("transfer")
class Transfer(Attack):
    """Transfer attack (Papernot et al. 2017; the black-box column of Madry et al. 2018 and the
    "transfer" sanity test of Athalye et al. 2018 and Carlini et al. 2019): PGD on a naturally
    trained surrogate of another architecture on the same training data, then the target is
    asked only for its prediction (it spends no gradient: its passes are the final forward).

    The surrogate is an ordinary run (defense `natural`, architecture `surrogate_model` with
    `surrogate_model_params`), trained
    on demand with this config's budget and cached like any run. There is no paper default for
    it: `mlp` (10 epochs of Adam at 1e-3, ×0.1 at 50% and 75%) trains in seconds on MNIST-sized data and is another
    architecture than every CNN; CIFAR suites should name a CNN (e.g. `preact_resnet18` against
    a WRN) and a fitting budget. The PGD on the surrogate uses the suite's `pgd` defaults
    (20 steps of 2.5·eps/20 from a random start, cross-entropy).
    """

    kind = "transfer"
    parts = ("pgd",)
    pretrained_defenses = ("natural",)

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        surrogate_model: str = "mlp"
        surrogate_model_params: dict = field(default_factory=dict)
        surrogate_epochs: int = 10
        surrogate_optimizer: str = "adam"
        surrogate_lr: float = 1e-3
        surrogate_batch_size: int = 128
        steps: int = 20
        loss: str = "ce"

        def __post_init__(self):
            require(self, at_least_one=("surrogate_epochs", "surrogate_batch_size"), positive=("surrogate_lr",))

    def __init__(self, **params):
        super().__init__(**params)
        c = self.config
        self.pgd = ATTACKS.get("pgd")(norm=c.norm, eps=c.eps, steps=c.steps, loss=c.loss)
        self.surrogate = None

    def prepare(self, ctx):
        c = self.config
        self.surrogate = ctx.pretrained(
            "natural", model=c.surrogate_model, model_params=dict(c.surrogate_model_params),
            train={"epochs": c.surrogate_epochs, "optimizer": c.surrogate_optimizer, "lr": c.surrogate_lr,
                   "batch_size": c.surrogate_batch_size, "weight_decay": 0.0, "schedule": "piecewise", "val_steps": 1})

    def perturb(self, model, x, y):
        if self.surrogate is None:
            raise BenchError("attack 'transfer' has no surrogate: call prepare(ctx) first (the evaluation does)")
        return self.pgd(self.surrogate, x, y)
