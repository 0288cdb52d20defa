"""Free adversarial training (Shafahi et al., "Adversarial Training for Free!", NeurIPS 2019)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.adversary.ball import ascent_step, clip_to_ball
from bench.core.config import require
from bench.core.defense import Defense, register_defense


@register_defense("free_at")
class FreeAT(Defense):
    """Algorithm 1: each minibatch is replayed m times; every replay takes one forward and one
    backward pass that gives both the parameter gradient (one optimizer step) and ∇_δ, and
    δ ← clip_ε(δ + ε·sign ∇_δ). δ starts at 0 and is carried across replays, batches and epochs.

    As the authors' code (mahyarnajibi/FreeAdversarialTraining, main_free.py): the model sees
    clamp(x + δ, 0, 1) in train mode, δ itself is clipped to the ε ball only, and δ holds one row
    per batch position: a smaller (last) batch uses and updates the first rows, the others keep
    their values. Replays 1..m−1 step `ctx.optimizer` here, at the LR the trainer set for the
    batch; the last replay's loss is returned for the trainer's step, and its ∇_δ (from the
    trainer's backward) updates δ in `on_step_end`. No parameter gradient is left set on return.
    L2 threats (not in the paper) take a step of ε along the L2-normalized gradient.

    Epochs: the paper runs N_ep/m passes over the data (the code: ceil(90/m) on ImageNet) so that
    training costs as much as N_ep natural epochs. The trainer's `epochs` counts passes over the
    data, i.e. the paper's N_ep/m: to reproduce a paper run, train ceil(N_ep/m) epochs. Under a
    suite's shared budget of E epochs Free-AT takes m·E optimizer steps per batch position at m
    forward/backward passes per sample per epoch (8 for m = 8, against 11 for `pgd_at`); the LR
    schedule spans the E passes, the m replays of a batch sharing one LR, as in the code.

    Defaults: m = 8, the paper's CIFAR-10 setting; step = ε (Algorithm 1).
    """

    @dataclass(frozen=True)
    class Config:
        replays: int = 8  # m
        step_ratio: float = 1.0  # δ step / ε

        def __post_init__(self):
            require(self, at_least_one=("replays",), positive=("step_ratio",))

    def __init__(self, **params):
        super().__init__(**params)
        self.delta: torch.Tensor | None = None  # the carried perturbation, one row per batch position
        self._pending: torch.Tensor | None = None  # the last replay's δ, whose gradient the trainer computes

    def training_step(self, model, x, y, ctx):
        for _ in range(self.config.replays - 1):
            loss, delta = self._replay(model, x, y)
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._ascend(delta, ctx)
            ctx.optimizer.step()
        ctx.optimizer.zero_grad(set_to_none=True)
        loss, self._pending = self._replay(model, x, y)
        return loss

    def on_step_end(self, model, ctx):
        if self._pending is not None and self._pending.grad is not None:
            self._ascend(self._pending, ctx)
        self._pending = None

    def _replay(self, model, x, y):
        if self.delta is None or len(self.delta) < len(x):  # the first batch is the largest
            self.delta = torch.zeros_like(x)
        self.delta = self.delta.to(x.device)
        delta = self.delta[:len(x)].clone().requires_grad_(True)
        return F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta

    @torch.no_grad()
    def _ascend(self, delta: torch.Tensor, ctx) -> None:
        eps, norm = ctx.threat.eps, ctx.threat.norm
        step = ascent_step(delta, delta.grad, norm, self.config.step_ratio * eps)
        self.delta[:len(delta)] = clip_to_ball(step, norm, eps)

    def state_dict(self) -> dict:
        return {} if self.delta is None else {"delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        self.delta = state.get("delta")
