"""Dynamic adversarial training with the FOSC criterion (Wang et al., ICML 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd_with_stopping
from bench.core.config import require
from bench.core.defense import Defense, register_defense
from bench.core.models import eval_mode
from bench.core.schedules import paper_epoch


def fosc(grad: torch.Tensor, x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Per-sample FOSC c(x') = max_{‖x''−x‖≤ε} ⟨x'' − x', g⟩ = ε‖g‖_* − ⟨x' − x, g⟩ (Wang et
    al. 2019, Definition 1), g = ∇ₓ of the loss at x', ‖·‖_* the dual norm (L1 for Linf, L2 for L2).
    Zero at a stationary point of the inner maximization; the [0, 1] box is ignored, as in the paper."""
    g, d = grad.flatten(1), (x_adv - x).flatten(1)
    dual = g.abs().sum(1) if norm == "Linf" else g.norm(dim=1)
    return eps * dual - (d * g).sum(1)


@register_defense("dat")
class DAT(Defense):
    """Wang et al. 2019, Sec. 4, Algorithm 1: PGD on CE from a uniform random start, where each
    sample stops as soon as its FOSC is at most c_t; the threshold decreases linearly over epochs,
    c_t = max(c_max − t·c_max/T', 0) (t the 0-based epoch), so early epochs train on weak, and late
    epochs on converged, adversarial examples. Loss: CE at the final iterates.

    Defaults (Sec. 5 and the authors' CIFAR-10 code): c_max = 0.5, T' = 100 of T = 120 epochs,
    at most K = 10 steps of ε/4 (2/255 at ε = 8/255). Under a budget of E epochs, epoch e (1-based)
    takes c = max(c_max·(1 − f/`control_fraction`), 0) at the fraction of training f = (e − ½)/E it
    stands for (`bench.core.schedules.paper_epoch`), the control fraction T'/T being the code's 100/120 by
    default: c starts just under c_max and reaches 0 in the epoch whose middle passes T'. c_max is
    on the scale of ε·‖∇ₓCE‖₁ on CIFAR-10 at 8/255: retune it for other datasets or eps.

    Choices where the paper and code differ or are silent:
    - The FOSC ball is centred on the natural x (the paper's definition); the code measures
      ⟨x' − x₀, g⟩ from the random start instead.
    - FOSC is checked before every step, from the random start on (the paper's while loop; the code
      always takes the first step). A stopped sample stays stopped and is no longer forwarded.
    - The inner maximization runs in eval mode (the Keras code's default learning phase), so stopping
      one sample does not change the others; the loss is the paper's plain mean CE (the code weights
      samples by their own CE after epoch 1, which the paper does not describe).
    Passes per sample depend on the data: one forward and backward per sample per check, ≤ K.
    """

    @dataclass(frozen=True)
    class Config:
        c_max: float = 0.5
        control_fraction: float = 100 / 120  # T' / T
        steps: int = 10
        step_ratio: float = 0.25  # step size / ε

        def __post_init__(self):
            require(self, at_least_one=("steps",), positive=("control_fraction", "step_ratio"),
                         non_negative=("c_max",))

    def threshold(self, epoch: int, epochs: int) -> float:
        """c_t for the 1-based `epoch` of `epochs`."""
        c = self.config
        return max(c.c_max * (1 - paper_epoch(epoch, epochs, 1.0) / c.control_fraction), 0.0)

    def training_step(self, model, x, y, ctx):
        c, eps, norm = self.config, ctx.threat.eps, ctx.threat.norm
        threshold = self.threshold(ctx.epoch, ctx.epochs)
        with eval_mode(model):
            x_adv = pgd_with_stopping(model, x, y, ce_loss,
                                      lambda logits, grad, x_k, x_0, y_k: fosc(grad, x_k, x_0, norm, eps) > threshold,
                                      eps=eps, norm=norm, steps=c.steps, step_size=c.step_ratio * eps,
                                      x_init=random_start(x, norm, eps))
        return F.cross_entropy(model(x_adv), y)
