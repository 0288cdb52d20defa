"""DeepFool (Moosavi-Dezfooli et al., CVPR 2016): the minimum-norm attack that repeatedly steps
to the nearest boundary of the classifier linearized at the current point."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.adversary.ball import per_sample
from bench.adversary.losses import other_classes
from bench.core.attack import Attack, register_attack
from bench.core.config import require
from bench.core.errors import BenchError

STEP_MARGIN = 1e-4  # the official code steps (pert + 1e-4)·w/‖w‖, just across the linearized boundary


@register_attack("deepfool")
class DeepFool(Attack):
    """DeepFool, multi-class (Moosavi-Dezfooli et al. 2016, Algorithm 2; L∞ by §3.3's ℓp rule).

    At each iterate x_i, for the candidate classes k ≠ y with f'_k = z_k − z_y and w'_k = ∇f'_k:
    l = argmin_k |f'_k| / ‖w'_k‖_q and r_i = (|f'_l|/‖w'_l‖_q + 1e-4)·w'_l/‖w'_l‖₂ (L2, q = 2) or
    (… + 1e-4)·sign(w'_l) (L∞, q = 1); r_tot += r_i; the next iterate is x + (1 + overshoot)·r_tot.
    Defaults are the paper's and its official code's (LTS4/DeepFool, deepfool.py): overshoot 0.02,
    at most 50 iterations, the 10 classes with the highest clean logits as candidates.

    Minimum-norm: returns the first misclassified iterate, or x where 50 iterations do not fool
    the model. Choices where the paper ignores the box: every iterate is clipped to [0, 1] (r_tot
    itself is not, as in the official code). The gradients are those of z_k − z_y, one backward
    pass per candidate k ≠ y (the official code takes one more, for z_y, and subtracts).
    """

    minimum_norm = True
    norms = ("L2", "Linf")
    iterative = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "L2"
        eps: float = 0.5
        steps: int = 50
        overshoot: float = 0.02
        candidates: int = 10

        def __post_init__(self):
            require(self, at_least_one=("steps",), non_negative=("overshoot",))
            if self.candidates < 2:
                raise BenchError(f"candidates must be >= 2, got {self.candidates}")

    def perturb(self, model, x, y):
        c = self.config
        x = x.detach()
        x_adv = x.clone()
        r_tot = torch.zeros_like(x)
        active = torch.arange(len(x), device=x.device)
        others = None  # per sample, the candidate classes k ≠ y (from the clean logits)
        for step in range(c.steps + 1):
            xa = (x[active] + (1 + c.overshoot) * r_tot[active]).clamp(0, 1).requires_grad_(True)
            with torch.enable_grad():
                logits = model(xa)
            ya = y[active]
            self.observe_in_ball(logits, ya, xa.detach(), x[active], active)
            if others is None:
                others = other_classes(logits.detach(), y, min(c.candidates, logits.shape[1]) - 1)
            fooled = logits.argmax(1) != ya
            x_adv[active[fooled]] = xa.detach()[fooled]
            keep = ~fooled
            if step == c.steps or not bool(keep.any()):
                break
            diff = logits.gather(1, others[active]) - logits.gather(1, ya[:, None])  # f'_k < 0 while correct
            grads = [torch.autograd.grad(diff[:, j].sum(), xa, retain_graph=j + 1 < diff.shape[1])[0]
                     for j in range(diff.shape[1])]
            active, f, w = active[keep], diff.detach()[keep], torch.stack(grads, 1)[keep]  # w: (B, K, C, H, W)
            r_tot[active] += self._step(f, w)
        return x_adv

    def _step(self, f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """r_i towards the nearest linearized boundary; a sample with all-zero gradients stays put."""
        flat = w.flatten(2)
        dual = flat.norm(dim=2) if self.config.norm == "L2" else flat.abs().sum(2)
        pert = torch.where(dual > 0, f.abs() / dual, torch.full_like(dual, float("inf")))
        pert, l = pert.min(1)
        rows = torch.arange(len(w), device=w.device)
        w_l = w[rows, l]
        length = per_sample(torch.where(pert.isfinite(), pert + STEP_MARGIN, torch.zeros_like(pert)), w_l)
        if self.config.norm == "Linf":
            return length * w_l.sign()
        l2 = per_sample(flat[rows, l].norm(dim=1), w_l)
        return length * w_l / torch.where(l2 > 0, l2, torch.ones_like(l2))
