"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search"), Linf and L2, score-based.

The reference is AutoAttack's version (github fra31/auto-attack, autoattack/square.py), which
torchattacks 3.5.1's Square ports: each iteration draws one square window (and, for Linf, one sign
per channel) for the whole batch. Random numbers are drawn in the same order and shapes and the
arithmetic runs in the same order, so on the CPU the two return the same points, bit for bit, given
the same seed.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn as nn

from bench.adversary.ball import per_sample
from bench.adversary.losses import margin_loss
from bench.core.attack import Attack, register_attack
from bench.core.config import require
from bench.core.errors import BenchError

NORM_EPS = 1e-12  # the official guard when normalizing a perturbation
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves after these of 10,000 iterations


def p_schedule(p_init: float, it: int, queries: int, rescale: bool = True) -> float:
    """The fraction of pixels a square covers at iteration `it`: p_init halved after iterations 10,
    50, 200, 500, 1k, 2k, 4k, 6k, 8k (the paper's schedule for 10,000 queries). With `rescale` (the
    official `SquareAttack`'s default, `resc_schedule=True`) the iteration is first mapped onto
    10,000, so that a budget of `queries` runs through the whole schedule; without it (as AutoAttack
    builds Square) the schedule is read at the iteration itself, so 5,000 queries stop at p_init/128.
    The official `p_selection`."""
    return p_init / 2 ** bisect.bisect_left(HALVINGS, int(it / queries * 10000) if rescale else it)


def _randint(high: int) -> int:
    """Uniform in {0, ..., high − 1} (0 when high is 0) from the global CPU RNG, as the official
    code (no GPU round trip: window positions are Python numbers)."""
    return int(torch.rand(1) * high)


def _signs(shape, device) -> torch.Tensor:
    return torch.sign(2 * torch.rand(shape, device=device) - 1)


def _unit_sum_sq(v: torch.Tensor) -> torch.Tensor:
    return v / (v ** 2).sum(dim=(0, 1), keepdim=True).sqrt()


def _bump_half(rows: int, cols: int) -> torch.Tensor:
    """A rows×cols bump of nested rectangles around the centre, weights 1/(k+1)² from the inside
    out (summed in the official order), unit L2 norm."""
    r = torch.arange(rows)[:, None] - rows // 2
    c = torch.arange(cols)[None, :] - cols // 2
    ring = torch.maximum(r.abs(), c.abs())
    bump = torch.zeros(rows, cols)
    for k in range(max(rows // 2, cols // 2) + 1):
        bump[ring <= k] += 1.0 / torch.tensor([float((k + 1) ** 2)])
    return _unit_sum_sq(bump)


@lru_cache(maxsize=None)
def _bump(s: int, device: torch.device) -> torch.Tensor:
    """The s×s L2 update pattern (Algorithm 3): a bump on the top half, minus one on the bottom."""
    return _unit_sum_sq(torch.cat((_bump_half(s // 2, s), -_bump_half(s - s // 2, s)))).to(device)


def _random_bump(s: int, device: torch.device) -> torch.Tensor:
    """The pattern, transposed with probability 1/2 (one draw). Contiguous, so that the sums over
    the window run in the same order either way."""
    bump = _bump(s, device)
    return bump.t().contiguous() if torch.rand(1) > 0.5 else bump


def _l2(v: torch.Tensor) -> torch.Tensor:
    return per_sample((v ** 2).flatten(1).sum(-1).sqrt(), v)


def _unit_l2(v: torch.Tensor) -> torch.Tensor:
    return v / (_l2(v) + NORM_EPS)


@register_attack("square")
class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020, Algorithm 1: random search; Algorithms 2, 3: the
    Linf and L2 square updates), untargeted, on the margin z_y − max_{k≠y} z_k (the official loss).

    Linf starts from vertical stripes x ± eps (one sign per column and channel) and each iteration
    sets one random s×s window to x ± eps (one sign per channel); L2 starts from a grid of ±bumps
    scaled to norm eps and each iteration moves the mass of a second window into a new ±bump on the
    first, keeping the norm at eps. An update is kept when it lowers the margin. The window side is
    s = round(√(p·h·w)) (Linf at least 1; L2 at least 3 and odd) with p from `p_schedule`.
    Defaults: 5,000 queries, p_init = 0.8, 1 restart (as AutoAttack's standard version) and the
    schedule of p rescaled to the budget (`rescale_schedule`, the official `SquareAttack` class's
    default; AutoAttack turns it off, see `autoattack`).

    As the official `perturb`: samples the model already misclassifies are not attacked (returned
    as they are); each restart runs only on samples no earlier run fooled. A sample costs one query
    for its initial point and one per iteration until it is fooled (at most `queries` + 1 per run;
    the clean forward pass comes on top, as in the official count). `stats` accumulates the attacked
    samples, their queries, the fooled ones and theirs. Unlike the official code, which returns x
    for a sample it does not fool, that sample gets its lowest-margin point (the same outcome; the
    evaluation sees the best loss).
    """

    kind = "score"
    iterative = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        queries: int = 5000
        p_init: float = 0.8
        restarts: int = 1
        rescale_schedule: bool = True

        def __post_init__(self):
            require(self, at_least_one=("queries", "restarts"), positive=("p_init",), fraction=("p_init",))

    def attack_robust(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.dim() != 4 or (c.norm == "L2" and min(x.shape[2:]) < 5):
            raise BenchError(f"attack 'square' needs images (N, C, H, W), for L2 of at least 5x5 pixels, "
                             f"got {tuple(x.shape)}")
        x = x.detach()
        x_best = x.clone()
        attacked = logits.argmax(1) == y
        margin = torch.where(attacked, float("inf"), float("-inf"))  # > 0: still to fool
        queries = torch.zeros(len(x), device=x.device)
        with torch.no_grad():
            for _ in range(c.restarts):
                idx = (margin > 0).nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                run_best, run_margin, used = self._run(model, x[idx], y[idx], idx)
                better = run_margin < margin[idx]
                x_best[idx] = torch.where(per_sample(better, run_best), run_best, x_best[idx])
                margin[idx] = torch.minimum(run_margin, margin[idx])
                queries[idx] += used
        self._count(queries[attacked], margin[attacked] <= 0)
        return x_best

    def _count(self, queries: torch.Tensor, fooled: torch.Tensor) -> None:
        s = self.accumulate(samples=len(queries), queries=int(queries.sum()), fooled=int(fooled.sum()),
                            queries_fooled=int(queries[fooled].sum()))
        s["mean_queries"] = s["queries"] / s["samples"] if s["samples"] else None
        s["mean_queries_fooled"] = s["queries_fooled"] / s["fooled"] if s["fooled"] else None

    def _margin(self, model: nn.Module, x_new: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One query: z_y − max_{k≠y} z_k at x_new (samples at positions `index` of the batch)."""
        logits = model(x_new)
        self.observe(logits, y, index=index)
        return -margin_loss(logits, y)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor):
        """One run on samples x (positions `index`): (best point, its margin, queries used) per sample."""
        c = self.config
        n, ch, h, w = x.shape
        if c.norm == "Linf":
            x_best = (x + c.eps * _signs((n, ch, 1, w), x.device)).clamp(0, 1)
        else:
            x_best = (x + _unit_l2(self._l2_start(x)) * c.eps).clamp(0, 1)
        margin = self._margin(model, x_best, y, index)
        queries = torch.ones(n, device=x.device)
        for it in range(c.queries):
            todo = (margin > 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            p = p_schedule(c.p_init, it, c.queries, c.rescale_schedule)
            step = self._linf_step if c.norm == "Linf" else self._l2_step
            x_new = step(x[todo], x_best[todo], p)
            new_margin = self._margin(model, x_new, y[todo], index[todo])
            better = new_margin < margin[todo]
            x_best[todo] = torch.where(per_sample(better, x_new), x_new, x_best[todo])
            margin[todo] = torch.where(better, new_margin, margin[todo])
            queries[todo] += 1
        return x_best, margin, queries

    def _linf_step(self, x: torch.Tensor, x_best: torch.Tensor, p: float) -> torch.Tensor:
        """Algorithm 2: one s×s window (the same for the batch) set to x ± eps, one sign per channel."""
        eps = self.config.eps
        ch, h, w = x.shape[1:]
        s = max(int(round(math.sqrt(p * (ch * h * w) / ch))), 1)
        vh, vw = _randint(h - s), _randint(w - s)
        window = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        x_win = x[window]
        new = x_best[window] + 2.0 * eps * _signs((ch, 1, 1), x.device)
        x_new = x_best.clone()
        x_new[window] = torch.min(torch.max(new, x_win - eps), x_win + eps).clamp(0, 1)
        return x_new

    def _l2_start(self, x: torch.Tensor) -> torch.Tensor:
        """A grid of (h // 5)-sided ±bumps (one sign per sample and channel each), as the official init."""
        n, ch, h, w = x.shape
        s = h // 5
        delta = torch.zeros_like(x)
        first = (h - 5 * s) // 2
        for i in range(h // s):
            for j in range(w // s):
                bump = _random_bump(s, x.device).view(1, 1, s, s)
                top, left = first + i * s, first + j * s
                delta[:, :, top:top + s, left:left + s] += bump * _signs((n, ch, 1, 1), x.device)
        return delta

    def _l2_step(self, x: torch.Tensor, x_best: torch.Tensor, p: float) -> torch.Tensor:
        """Algorithm 3: a new ±bump on window 1 carrying the perturbation mass of windows 1 and 2
        (and what the budget has left); window 2 is emptied; the result is rescaled to norm eps."""
        eps = self.config.eps
        n, ch, h, w = x.shape
        s = max(int(round(math.sqrt(p * (ch * h * w) / ch))), 3)
        s += 1 - s % 2
        s = min(s, min(h, w) - 1 + min(h, w) % 2)  # the window must fit (the official code fails there)
        vh, vw = _randint(h - s), _randint(w - s)
        vh2, vw2 = _randint(h - s), _randint(w - s)
        win1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        win2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
        delta = x_best - x
        old = delta[win1]
        norm_win1 = (old ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
        both = torch.zeros(h, w, device=x.device)
        both[win1[2:]] = 1.0
        both[win2[2:]] = 1.0
        norm_both = _l2(delta * both)
        new = _random_bump(s, x.device).view(1, 1, s, s) * _signs((n, ch, 1, 1), x.device)
        new = new + old / (NORM_EPS + norm_win1)
        eps2 = float(torch.tensor(eps) ** 2)  # rounded as the official code's float32 eps²
        room = torch.clamp(eps2 - _l2(delta) ** 2, min=0) / ch + norm_both ** 2
        new = new / (NORM_EPS + (new ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * room.sqrt()
        delta[win2] = 0.0
        delta[win1] = new
        return (x + _unit_l2(delta) * eps).clamp(0, 1)
