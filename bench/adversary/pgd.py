"""Projected gradient ascent (Madry et al., ICLR 2018): the one loop that the `pgd` attack and its
relatives, the defenses' inner maximizations, the trainer's validation and the curves all run.

- `pgd`: `steps` projected ascent steps on a per-sample loss from a given start; `observe` sees
  every iterate it differentiates at, `after_step` every new iterate (the steps curve records
  chosen step counts of one trajectory with it);
- `best_of_restarts`: restarts of such a run on the samples not fooled yet, keeping per sample the
  first restart that fools the model (`after_restart` lets the restarts curve record chosen counts
  of one run);
- `pgd_with_stopping`: per-sample early stopping (FOSC in DAT, margins in P-SAT).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from bench.adversary.ball import ascent_step, project, random_start

Observer = Callable[[torch.Tensor, torch.Tensor], None]  # (logits, per-sample loss) at an iterate
LossFn = Callable[[torch.Tensor], torch.Tensor]  # logits -> per-sample loss (labels bound)


def input_gradient(model: nn.Module, x: torch.Tensor, loss_fn: LossFn,
                   observe: Observer | None = None) -> torch.Tensor:
    """∇_x of the summed per-sample loss; the model's parameters get no gradient. `observe`, if
    given, sees the logits and per-sample losses at x (no extra forward pass)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        losses = loss_fn(logits)
        if observe is not None:
            observe(logits, losses)
        return torch.autograd.grad(losses.sum(), x)[0]


def pgd(model: nn.Module, x: torch.Tensor, loss_fn: LossFn, *, eps: float, norm: str, steps: int,
        step_size: float, x_init: torch.Tensor | None = None, observe: Observer | None = None,
        after_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Maximize `loss_fn(model(x'))` over the eps ball by `steps` projected ascent steps from
    `x_init` (default: x). Returns the last iterate. `observe` sees every iterate but the last (see
    `input_gradient`); `after_step(t, x_t)` is called with the iterate after step t (from 1)."""
    x = x.detach()
    x_adv = (x if x_init is None else x_init).detach()
    for t in range(1, steps + 1):
        grad = input_gradient(model, x_adv, loss_fn, observe)
        x_adv = project(ascent_step(x_adv, grad, norm, step_size), x, norm, eps).detach()
        if after_step is not None:
            after_step(t, x_adv)
    return x_adv


def best_of_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     run: Callable[[torch.Tensor | None], torch.Tensor], restarts: int,
                     after_restart: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                     ) -> torch.Tensor:
    """Up to `restarts` calls of `run(idx)`, each drawing its own start for the samples at positions
    `idx` of the batch (None: all of them) and returning their end points. The first restart attacks
    every sample, each later one only the samples no earlier restart fooled (so a sample's draws
    depend on the restarts it needed); per sample, the end point of the first restart that
    misclassifies it, else of the last one. Once every sample is fooled no further restart runs.
    `after_restart(r, best, fooled)` is called after restart r (from 1) for every r up to
    `restarts`, also those not run."""
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for r in range(1, restarts + 1):
        idx = None if r == 1 else (~fooled).nonzero().squeeze(1)
        if idx is None or len(idx):
            x_adv = run(idx)
            with torch.no_grad():
                now_fooled = model(x_adv).argmax(1) != (y if idx is None else y[idx])
            if idx is None:
                best, fooled = x_adv.clone(), now_fooled
            else:
                best[idx] = x_adv
                fooled[idx] = now_fooled
        elif after_restart is None:
            break
        if after_restart is not None:
            after_restart(r, best, fooled)
    return best


StopRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pgd_with_stopping(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], going: StopRule, *,
                      eps: float, norm: str, steps: int, step_size: float, x_init: torch.Tensor) -> torch.Tensor:
    """PGD with per-sample early stopping: before each of the `steps` steps every running sample
    is checked at its current iterate, `going(logits, grad, x_adv, x, y) -> bool mask` (logits and
    `loss(logits, y)`'s input gradient there, from the one forward and backward the step needs);
    the samples that pass take the step, the others stop for good at that iterate and are no
    longer forwarded. So a sample costs one forward and backward per check, at most `steps`.
    Returns the iterates (a new tensor; `x_init` is not modified)."""
    x, x_adv = x.detach(), x_init.detach().clone()
    active = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        x_k, x_0, y_k, seen = x_adv[active], x[active], y[active], []
        grad = input_gradient(model, x_k, lambda logits: loss(logits, y_k),
                              lambda logits, _: seen.append(logits.detach()))
        keep = going(seen[0], grad, x_k, x_0, y_k)
        active = active[keep]
        if len(active) == 0:
            break
        x_adv[active] = project(ascent_step(x_k[keep], grad[keep], norm, step_size), x_0[keep], norm, eps)
    return x_adv


def pgd_with_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, eps: float, norm: str,
                      steps: int, step_size: float, uniform_start: bool = True, restarts: int = 1,
                      observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None
                      ) -> torch.Tensor:
    """The PGD attack (Madry et al. 2018): `steps` steps on `loss(logits, y)` from a uniform random
    start in the ball (or from x), repeated `restarts` times with `best_of_restarts` (restarts after
    the first on the samples not fooled yet; one restart returns its end points as they are, without
    a forward pass to compare). `observe(logits, losses, index)` sees every iterate, `index` the
    positions in the batch of the samples it covers (None: all)."""
    def run(idx: torch.Tensor | None) -> torch.Tensor:
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        start = random_start(xs, norm, eps) if uniform_start else xs
        seen = None if observe is None else lambda logits, losses: observe(logits, losses, idx)
        return pgd(model, xs, lambda logits: loss(logits, ys), eps=eps, norm=norm, steps=steps,
                   step_size=step_size, x_init=start, observe=seen)

    return run(None) if restarts == 1 else best_of_restarts(model, x, y, run, restarts)
