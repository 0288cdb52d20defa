"""AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Sec. 5): a fixed cascade of parameter-free attacks.

When the official package (github fra31/auto-attack, `import autoattack`) is installed, it runs,
configured explicitly from our Config, and `implementation` says so. Otherwise the cascade is
composed from this project's `apgd_ce`, `apgd_dlr`, `apgd_t`, `fab` and `square`, configured as
the official `AutoAttack.set_version` does (autoattack/autoattack.py).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import torch

from bench.core.attack import ATTACKS, Attack, TraceStep, register_attack
from bench.core.config import require, require_choice
from bench.core.errors import BenchError
from bench.core.threat import BALL_TOLERANCE, perturbation_norms

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
COMPONENTS = {"apgd-ce": "apgd_ce", "apgd-dlr": "apgd_dlr", "apgd-t": "apgd_t", "fab": "fab", "fab-t": "fab",
              "square": "square"}  # label in the official code -> registered attack


def official_version() -> str | None:
    """The installed official package's version ("unknown" without metadata), or None when it is absent."""
    try:
        import autoattack  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.metadata.version("autoattack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@register_attack("autoattack")
class AutoAttack(Attack):
    """AutoAttack, versions as the official code (Sec. 5; `set_version`):

    - standard: APGD-CE (1 restart), APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries);
    - plus: APGD-CE and APGD-DLR (5 restarts each), FAB (5 restarts), Square, APGD-T, FAB-T (1 restart);
    - rand (randomized defenses): APGD-CE and APGD-DLR with EOT over 20 draws, 1 restart.

    APGD: 100 steps, ρ = 0.75; FAB: 100 steps, α_max = 0.1, η = 1.05, β = 0.9, restarts at 0.5·eps;
    Square: p_init = 0.8, 1 restart, and the schedule of p not rescaled to the budget (the official
    code builds `SquareAttack(..., resc_schedule=False)`: with 5,000 queries p halves on the
    10,000-query schedule's iterations and ends at p_init/128).

    The cascade: each component attacks only the samples every earlier one left robust
    (clean-misclassified ones are never attacked), and its point replaces x only where it is
    misclassified and within the eps ball (FAB returns minimum-norm points that may lie outside);
    a sample no component fools is returned as x. `stats["robust_after"][component]` accumulates
    the robust count after each component; `stats["components"]` records the configuration of
    each component that ran. Iterates the components observe are forwarded to this attack's trace.

    Fewer than 10 classes: targets are capped at C − 1 (the official code would index past the
    logits); APGD-T is left out below 4 classes and APGD-DLR below 3, where their losses are
    undefined (the official code warns, then fails on an index); `stats["skipped"]` lists them.

    Where the official code re-seeds the RNG before each component, ours draw from the global RNG
    in turn (the evaluation seeds it). The official package gets a seed drawn from that RNG.
    """

    revision = 2  # 2: Square without the rescaled p schedule, as the official AutoAttack
    parts = tuple(sorted(set(COMPONENTS.values())))
    iterative = True
    ensemble = True

    @dataclass(frozen=True)
    class Config:
        norm: str = "Linf"
        eps: float = 8 / 255
        version: str = "standard"
        apgd_steps: int = 100
        fab_steps: int = 100
        square_queries: int = 5000
        n_target_classes: int = 9
        eot_iter: int = 20

        def __post_init__(self):
            require_choice(self.version, VERSIONS, "version")
            require(self, at_least_one=("apgd_steps", "fab_steps", "square_queries", "n_target_classes", "eot_iter"))

    def __init__(self, **params):
        super().__init__(**params)
        version = official_version()
        self.official = version is not None
        if self.official:
            self.implementation = f"autoattack {version} (official)"
        else:
            self.components(self.config.n_target_classes + 1)  # a missing component or a bad parameter fails here

    def plan(self, num_classes: int) -> tuple[dict[str, tuple[str, dict]], list[str]]:
        """The components of this version for a `num_classes` model, in order, as {label: (registered
        attack, parameters)}, and the labels left out because their loss needs more classes."""
        c = self.config
        ball = dict(norm=c.norm, eps=c.eps)
        targets = min(c.n_target_classes, num_classes - 1)
        restarts = 5 if c.version == "plus" else 1
        apgd = dict(ball, steps=c.apgd_steps, rho=0.75, eot_iter=c.eot_iter if c.version == "rand" else 1)
        fab = dict(ball, steps=c.fab_steps, n_target_classes=targets, alpha_max=0.1, eta=1.05, beta=0.9,
                   restart_scale=0.5)
        table = {
            "apgd-ce": ("apgd_ce", dict(apgd, restarts=restarts)),
            "apgd-dlr": ("apgd_dlr", dict(apgd, restarts=restarts)),
            "apgd-t": ("apgd_t", dict(apgd, restarts=1, n_target_classes=targets)),
            "fab": ("fab", dict(fab, restarts=restarts, targeted=False)),
            "fab-t": ("fab", dict(fab, restarts=1, targeted=True)),
            "square": ("square", dict(ball, queries=c.square_queries, p_init=0.8, restarts=1,
                                      rescale_schedule=False)),
        }
        run, skipped = {}, []
        for label in VERSIONS[c.version]:
            name, params = table[label]
            if num_classes < getattr(ATTACKS.get(name), "min_classes", 2):
                skipped.append(label)
            else:
                run[label] = (name, params)
        return run, skipped

    def components(self, num_classes: int) -> list[tuple[str, Attack]]:
        """The component attacks for a `num_classes` model, built through the registry."""
        out = []
        for label, (name, params) in self.plan(num_classes)[0].items():
            try:
                out.append((label, ATTACKS.get(name)(**params)))
            except BenchError as exc:
                raise BenchError(f"attack 'autoattack', component {label}: {exc}") from None
        return out

    def perturb(self, model, x, y):
        x = x.detach()
        with torch.no_grad():
            logits = model(x)
        plan, skipped = self.plan(logits.shape[1])
        self.stats["components"] = {label: {"attack": name, **params} for label, (name, params) in plan.items()}
        self.stats["skipped"] = skipped
        if self.official:
            return self._official(model, x, y, logits.shape[1], plan)
        robust = logits.argmax(1) == y
        x_adv = x.clone()
        self.accumulate("robust_after", clean=int(robust.sum()))
        for label, attack in self.components(logits.shape[1]):
            idx = robust.nonzero().squeeze(1)
            if idx.numel():
                xs, ys = x[idx], y[idx]
                if self._trace is not None:
                    attack.start_trace()
                xa = attack.attack_robust(model, xs, ys, logits[idx])  # no second clean forward
                if self._trace is not None:
                    self._trace.extend(TraceStep(s.fooled, s.loss, idx if s.index is None else idx[s.index])
                                       for s in attack.pop_trace())
                with torch.no_grad():
                    fooled = model(xa).argmax(1) != ys
                fooled &= perturbation_norms(xa, xs, self.config.norm) <= self.config.eps + BALL_TOLERANCE
                x_adv[idx[fooled]] = xa[fooled].detach()
                robust[idx[fooled]] = False
            self.accumulate("robust_after", **{label: int(robust.sum())})
        return x_adv

    def _official(self, model, x, y, num_classes: int, plan: dict) -> torch.Tensor:
        """The official package's cascade on this batch, every parameter set from our Config."""
        from autoattack import AutoAttack as Official

        c = self.config
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        adversary = Official(model, norm=c.norm, eps=c.eps, version=c.version, seed=seed, verbose=False,
                             device=x.device)
        adversary.attacks_to_run = list(plan)
        targets = min(c.n_target_classes, num_classes - 1)
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = c.apgd_steps
        adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = targets
        adversary.fab.n_iter = c.fab_steps
        adversary.square.n_queries = c.square_queries
        if c.version == "rand":
            adversary.apgd.eot_iter = c.eot_iter
        return adversary.run_standard_evaluation(x, y, bs=len(x)).detach()
