"""AutoAttack (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Sec. 5): a fixed cascade of parameter-free attacks.

Two implementations, chosen by the config's `implementation` (part of every evaluation's identity,
and its provenance names the code and version that ran):
- "atbench" (default): the cascade composed from this project's `apgd_ce`, `apgd_dlr`, `apgd_t`,
  `fab` and `square`, configured as the official `AutoAttack._set_version` does; it reports the
  robust count after each component and forwards the iterates its components observe;
- "official": Croce & Hein's code, the `pyautoattack` package (the attack modules of github
  fra31/auto-attack, packaged), its cascade `run_standard_evaluation` with every component
  constructed from our Config.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass

import torch

from bench.core.attack import ATTACKS, Attack, TraceStep, register_attack
from bench.core.config import require, require_choice
from bench.core.errors import BenchError
from bench.core.threat import BALL_TOLERANCE, perturbation_norms

IMPLEMENTATIONS = ("atbench", "official")

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
COMPONENTS = {"apgd-ce": "apgd_ce", "apgd-dlr": "apgd_dlr", "apgd-t": "apgd_t", "fab": "fab", "fab-t": "fab",
              "square": "square"}  # label in the official code -> registered attack


def official_version() -> str:
    """The installed `pyautoattack`'s version; a BenchError saying what to install when it is absent."""
    try:
        import pyautoattack
    except ImportError:
        raise BenchError("attack 'autoattack' with implementation=\"official\" needs Croce & Hein's package: "
                         "pip install pyautoattack") from None
    try:
        return importlib.metadata.version("pyautoattack")
    except importlib.metadata.PackageNotFoundError:
        return getattr(pyautoattack, "__version__", "unknown")


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
    the robust count after each component (ours only: the official code keeps it to itself);
    `stats["components"]` records the configuration of each component that ran. Iterates the
    components observe are forwarded to this attack's trace (ours only).

    Seeding, as the official code: one seed per batch, drawn from the global RNG (which the
    evaluation seeds), and the RNG re-seeded with it before each component. Both implementations
    draw the same seed, so on the CPU their components start from the same random points.

    The official package is given APGD objects built with `apgd_steps` (its APGD derives the
    step-size checkpoints from `n_iter` in its constructor: setting `n_iter` afterwards leaves
    the 100-step schedule in place). Its warnings (randomized or dynamic defense, probabilities
    for logits, zero gradients, Square beating the white-box attacks) are kept in
    `stats["official_warnings"]`.

    Fewer than 10 classes: targets are capped at C − 1 (the official code would index past the
    logits); APGD-T is left out below 4 classes and APGD-DLR below 3, where their losses are
    undefined (the official code warns, then fails on an index); `stats["skipped"]` lists them.
    """

    revision = 3  # 3: the RNG re-seeded before each component, as the official code
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
        implementation: str = "atbench"

        def __post_init__(self):
            require_choice(self.version, VERSIONS, "version")
            require_choice(self.implementation, IMPLEMENTATIONS, "implementation")
            require(self, at_least_one=("apgd_steps", "fab_steps", "square_queries", "n_target_classes", "eot_iter"))

    def __init__(self, **params):
        super().__init__(**params)
        self.official = self.config.implementation == "official"
        if self.official:
            self.implementation = f"pyautoattack {official_version()} (official)"
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
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        if self.official:
            return self._official(model, x, y, plan, seed)
        robust = logits.argmax(1) == y
        x_adv = x.clone()
        self.accumulate("robust_after", clean=int(robust.sum()))
        for label, attack in self.components(logits.shape[1]):
            idx = robust.nonzero().squeeze(1)
            if idx.numel():
                xs, ys = x[idx], y[idx]
                torch.manual_seed(seed)
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

    def official_adversary(self, model, plan: dict, seed: int, device: torch.device):
        """The official `AutoAttack` running the components of `plan`, each constructed from its
        parameters (one APGD object serves APGD-CE and APGD-DLR, one FAB object FAB and FAB-T, as
        in the official code)."""
        from pyautoattack import AutoAttack as Official
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from pyautoattack.fab_pt import FABAttack_PT
        from pyautoattack.square import SquareAttack

        c = self.config
        adversary = Official(model, attacks=list(plan), device=device, eps=c.eps, norm=c.norm, seed=seed,
                             version="custom")
        adversary.version, adversary.verbose = c.version, False  # the version only decides its randomness check
        common = dict(norm=c.norm, eps=c.eps, seed=seed, device=device)
        apgd = plan.get("apgd-ce", plan.get("apgd-dlr"))
        if apgd is not None:
            p = apgd[1]
            adversary.apgd = APGDAttack(model, n_iter=p["steps"], n_restarts=p["restarts"], eot_iter=p["eot_iter"],
                                        rho=p["rho"], logger=adversary.logger, **common)
        if "apgd-t" in plan:
            p = plan["apgd-t"][1]
            adversary.apgd_targeted = APGDAttack_targeted(
                model, n_iter=p["steps"], n_restarts=p["restarts"], eot_iter=p["eot_iter"], rho=p["rho"],
                n_target_classes=p["n_target_classes"], logger=adversary.logger, **common)
        fab = plan.get("fab", plan.get("fab-t"))
        if fab is not None:
            p = fab[1]
            adversary.fab = FABAttack_PT(model, n_restarts=p["restarts"], n_iter=p["steps"], alpha_max=p["alpha_max"],
                                         eta=p["eta"], beta=p["beta"], n_target_classes=p["n_target_classes"],
                                         **common)
        if "square" in plan:
            p = plan["square"][1]
            adversary.square = SquareAttack(model, p_init=p["p_init"], n_queries=p["queries"],
                                            n_restarts=p["restarts"], resc_schedule=p["rescale_schedule"], **common)
        return adversary

    def _official(self, model, x, y, plan: dict, seed: int) -> torch.Tensor:
        """The official package's cascade on this batch; its warnings go to `stats`, not to the log."""
        adversary = self.official_adversary(model, plan, seed, x.device)
        warnings = _Collect()
        adversary.logger.addHandler(warnings)
        propagate, adversary.logger.propagate = adversary.logger.propagate, False
        try:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        finally:
            adversary.logger.removeHandler(warnings)
            adversary.logger.propagate = propagate
        if warnings.messages:
            known = self.stats.setdefault("official_warnings", [])
            known += [m for m in dict.fromkeys(warnings.messages) if m not in known]
        return x_adv.detach()


class _Collect(logging.Handler):
    """Keeps the messages of warnings and worse."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
