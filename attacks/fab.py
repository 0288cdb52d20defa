"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"): untargeted and targeted (FAB-T), Linf and L2.

The reference is the official code (github fra31/auto-attack, autoattack/fab_base.py, fab_pt.py and
fab_projections.py), which torchattacks 3.5.1's FAB ports. The iterates follow it step for step;
the projections onto a hyperplane within the box are written differently (a sorted sweep over the
breakpoints instead of a bisection) but solve the same problem, so the two agree to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.adversary.ball import per_sample, sphere_start
from bench.core.attack import Attack, register_attack
from bench.core.config import require
from bench.core.errors import BenchError
from bench.core.threat import perturbation_norms

DIST_EPS = 1e-12  # the official guard in |f_k| / ‖∇f_k‖ (distance to each linearized boundary)
STEP_FLOOR = 1e-8  # the official floor on ‖d‖ in the bias α = ‖d₁‖ / (‖d₁‖ + ‖d₂‖)
W_FLOOR = 1e-8  # the official L2 projection treats coordinates with |w_i| < 1e-8 as zero


def _gather_sorted(values: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`key` sorted along dim 1 and `values` in the same order."""
    key_sorted, order = key.sort(1)
    return key_sorted, values.gather(1, order)


def _suffix_sum(v: torch.Tensor) -> torch.Tensor:
    """Column k: the sum of columns k, k + 1, ... Summed from the end (not total − prefix sum), it
    does not cancel: it is 0 exactly past the last non-zero term, positive before it."""
    return v.flip(1).cumsum(1).flip(1)


def project_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest-L2 d with <w, t + d> = b and t + d in [0, 1] (rows: points t, normals w, offsets
    b); where the box does not reach the hyperplane, the box corner closest to it.

    With c = <w, t> − b made >= 0 by flipping w, the solution is d_i = clip(−λ·w_i, −t_i, 1 − t_i)
    for the λ >= 0 where Σ w_i d_i = −c. That sum is piecewise linear and decreasing in λ; it bends
    where a coordinate reaches its bound, at r_i = t_i / w_i (w_i > 0) or (t_i − 1) / w_i (w_i < 0).
    Sweeping the sorted r_i finds the segment that holds λ, then λ solves one linear equation.
    """
    c = (w * t).sum(1) - b
    w = torch.where(c[:, None] >= 0, w, -w)
    c = c.abs()
    active = w.abs() >= W_FLOOR
    w = torch.where(active, w, torch.zeros_like(w))
    r = torch.where(w > 0, t, t - 1) / torch.where(active, w, torch.ones_like(w))
    r = torch.where(active, r, torch.full_like(r, float("inf")))
    r_sorted, w2 = _gather_sorted(w * w, r)
    r_sorted = torch.where(w2 > 0, r_sorted, torch.zeros_like(r_sorted))  # inactive: no bend, no weight
    # Segment k (k coordinates clipped): Σ w_i d_i = A_k − λ·F_k with A_k = −Σ_{j<=k} r_j w_j², F_k = Σ_{j>k} w_j².
    a = F.pad(-(r_sorted * w2).cumsum(1), (1, 0))
    f = F.pad(_suffix_sum(w2), (0, 1))
    at_bends = a[:, 1:] - r_sorted * f[:, 1:]
    k = (at_bends > -c[:, None]).sum(1, keepdim=True)  # bends passed before the sum reaches −c
    infeasible = k.squeeze(1) == t.shape[1]
    lam = (a.gather(1, k).squeeze(1) + c) / f.gather(1, k).squeeze(1)
    lam = torch.where(infeasible, torch.full_like(lam, float("inf")), lam)
    d = torch.minimum(torch.maximum(-lam[:, None] * w, -t), 1 - t)
    return torch.where(active, d, torch.zeros_like(d))


def project_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest-Linf d with <w, t + d> = b and t + d in [0, 1]; where the box does not reach the
    hyperplane, the box corner closest to it.

    With c = <w, t> − b made >= 0 by flipping w, the solution is d_i = −sign(w_i)·min(δ, p_i), where
    p_i is the room towards the box in that direction (t_i for w_i > 0, 1 − t_i for w_i < 0) and δ
    solves Σ |w_i|·min(δ, p_i) = c, an increasing piecewise-linear function of δ bending at the p_i.
    """
    c = (w * t).sum(1) - b
    w = torch.where(c[:, None] >= 0, w, -w)
    c = c.abs()
    room = torch.where(w > 0, t, 1 - t)
    p_sorted, aw = _gather_sorted(w.abs(), room)
    # Segment k (k coordinates saturated): Σ = P_k + δ·W_k with P_k = Σ_{j<=k} |w_j| p_j, W_k = Σ_{j>k} |w_j|.
    p_sum = F.pad((aw * p_sorted).cumsum(1), (1, 0))
    w_sum = F.pad(_suffix_sum(aw), (0, 1))
    at_bends = p_sum[:, 1:] + p_sorted * w_sum[:, 1:]
    k = (at_bends < c[:, None]).sum(1, keepdim=True)
    infeasible = k.squeeze(1) == t.shape[1]
    delta = (c - p_sum.gather(1, k).squeeze(1)) / w_sum.gather(1, k).squeeze(1)
    delta = torch.where(infeasible, torch.full_like(delta, float("inf")), delta)
    d = -w.sign() * torch.minimum(delta[:, None], room)
    return torch.where(w != 0, d, torch.zeros_like(d))


PROJECTIONS = {"Linf": project_linf, "L2": project_l2}


@register_attack("fab")
class FAB(Attack):
    """FAB (Croce & Hein 2020, Algorithm 1; targeted FAB-T as in AutoAttack, Croce & Hein 2020b).

    Each step linearizes the model at the iterate x⁽ⁱ⁾, picks the class k whose linearized boundary
    f_k − f_y = 0 is closest (|f_k − f_y| / ‖∇(f_k − f_y)‖ in the dual norm; FAB-T: the target), and
    projects both x⁽ⁱ⁾ and x onto that hyperplane within [0, 1] (d₁, d₂). The next iterate is the
    biased combination (1 − α)(x⁽ⁱ⁾ + η·d₁) + α(x + η·d₂), α = min(‖d₁‖ / (‖d₁‖ + ‖d₂‖), α_max),
    clipped to [0, 1]. When it is misclassified it is recorded if closer than the best so far, and
    pulled back towards x: x + β(x⁽ⁱ⁺¹⁾ − x). Defaults are the paper's and the official code's:
    100 steps, α_max = 0.1, η = 1.05, β = 0.9, 1 restart; FAB-T attacks the 9 most likely wrong
    classes (capped at C − 1), one run each, as AutoAttack's standard version.

    Minimum-norm: returns per sample the closest misclassified point found, wherever it lies, or x
    where none was found (and for samples the model already misclassifies, which are not attacked).

    As the official `perturb`, `eps` is only used between runs: later restarts and targets run only
    on samples without an adversarial point within eps, and a restart (every run but the first of
    each target) starts at x + restart_scale·eps·t/‖t‖ with t ~ U[−1, 1]^D (Linf) or N(0, I) (L2),
    clipped to [0, 1]: APGD's start (`sphere_start`) at that radius. (The official radius is min(best
    norm so far, eps)·0.5; restarts only run where the best is beyond eps, so it is eps·0.5.) The
    point returned is the closest of all runs.

    Costs per step and attacked sample: one forward pass and K backward passes for the gradients of
    the differences f_k − f_y (K = C − 1 untargeted, one fewer than the official code's C gradients
    of the logits; K = 1 targeted), then one forward pass to check the new iterate; plus one clean
    forward pass per sample. Both iterates of a step are observed, counted as fooled only inside the
    eps ball. The evaluation may thus report a silent success: the point pulled back towards x after
    a success is linearized at but never checked, so never recorded (as in the official code).
    """

    minimum_norm = True
    iterative = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        steps: int = 100
        restarts: int = 1
        targeted: bool = False
        n_target_classes: int = 9
        alpha_max: float = 0.1
        eta: float = 1.05
        beta: float = 0.9
        restart_scale: float = 0.5

        def __post_init__(self):
            require(self, at_least_one=("steps", "restarts", "n_target_classes"), fraction=("alpha_max",),
                    positive=("beta", "restart_scale"))
            if not (self.eta >= 1 and self.beta < 1 and self.restart_scale <= 1):
                raise BenchError(f"eta must be >= 1, beta < 1 and restart_scale <= 1, got eta={self.eta}, "
                                 f"beta={self.beta}, restart_scale={self.restart_scale}")

    def attack_robust(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = x.detach()
        best, best_norm = x.clone(), torch.full((len(x),), float("inf"), device=x.device)
        todo = logits.argmax(1) == y  # correctly classified, no adversarial point within eps yet
        n_classes = logits.shape[1]
        if c.targeted:  # one run per target: the 2nd, 3rd, ... most likely class (the official sort)
            ranked = logits.sort(dim=1)[1]
            runs = [ranked[:, -rank, None] for rank in range(2, min(c.n_target_classes, n_classes - 1) + 2)]
        else:  # one run towards every class but y, in increasing order
            others = torch.arange(n_classes - 1, device=x.device).expand(len(x), -1)
            runs = [others + (others >= y[:, None]).long()]
        for classes in runs:
            for restart in range(c.restarts):
                idx = todo.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return best
                x0 = x[idx]
                start = x0 if restart == 0 else sphere_start(x0, c.norm, c.restart_scale * c.eps)
                adv, dist = self._run(model, x0, y[idx], classes[idx], start, idx)
                closer = dist < best_norm[idx]
                best[idx] = torch.where(per_sample(closer, adv), adv, best[idx])
                best_norm[idx] = torch.minimum(dist, best_norm[idx])
                todo[idx] = dist > c.eps
        return best

    def _linearize(self, model: nn.Module, x1: torch.Tensor, y: torch.Tensor, classes: torch.Tensor):
        """Logits at x1, the differences f_k − f_y for k in `classes` (n, K) and their input
        gradients (n, K, D): one forward and K backward passes."""
        z = x1.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z)
            diff = logits.gather(1, classes) - logits.gather(1, y[:, None])
            n_classes = classes.shape[1]
            grads = [torch.autograd.grad(diff[:, j].sum(), z, retain_graph=j < n_classes - 1)[0].flatten(1)
                     for j in range(n_classes)]
        return logits.detach(), diff.detach(), torch.stack(grads, 1)

    def _run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, classes: torch.Tensor,
             start: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One run of FAB from `start` on samples x0 (positions `index` in the batch), all correctly
        classified, towards the boundaries f_k = f_y of `classes` (n, K). Returns the closest
        misclassified iterate (x0 where none) and its distance (inf where none)."""
        c = self.config
        project = PROJECTIONS[c.norm]
        n = len(x0)
        rows = torch.arange(n, device=x0.device)
        x0_flat = x0.flatten(1)
        best, best_norm = x0.clone(), torch.full((n,), float("inf"), device=x0.device)
        x1 = start
        for _ in range(c.steps):
            logits, df, dg = self._linearize(model, x1, y, classes)
            self.observe_in_ball(logits, y, x1, x0, index)
            with torch.no_grad():
                dual = dg.abs().sum(-1) if c.norm == "Linf" else (dg ** 2).sum(-1).sqrt()
                k = (df.abs() / (dual + DIST_EPS)).argmin(1)
                w = dg[rows, k]
                b = (w * x1.flatten(1)).sum(1) - df[rows, k]
                d = project(torch.cat((x1.flatten(1), x0_flat)), torch.cat((w, w)), torch.cat((b, b)))
                size = perturbation_norms(d, torch.zeros_like(d), c.norm).clamp_min(STEP_FLOOR)
                alpha = per_sample((size[:n] / (size[:n] + size[n:])).clamp(0, c.alpha_max), x0)
                d1, d2 = d[:n].view_as(x0), d[n:].view_as(x0)
                x1 = ((x1 + c.eta * d1) * (1 - alpha) + (x0 + c.eta * d2) * alpha).clamp(0, 1)
                logits = model(x1)
                self.observe_in_ball(logits, y, x1, x0, index)
                fooled = logits.argmax(1) != y
                dist = perturbation_norms(x1, x0, c.norm)
                closer = fooled & (dist < best_norm)
                best = torch.where(per_sample(closer, x0), x1, best)
                best_norm = torch.where(closer, dist, best_norm)
                x1 = torch.where(per_sample(fooled, x0), x0 + (x1 - x0) * c.beta, x1)
        return best, best_norm
