"""The Python API (`import atbench`): evaluate any model with the evaluation stage of `bench eval`
(clean, the attacks, the curves, the sanity checks, the adaptive stage), every result stored, and
get an `EvaluationResult` back. Also what `bench eval` shares with it: attack specs and the device."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from bench.core.data import Dataset, load_dataset
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel, parse_eps
from bench.engine.adaptive import AdaptiveSettings, adaptive_settings, describe
from bench.engine.curves import CurveSettings
from bench.engine.evaluation import AttackSpec
from bench.engine.external import normalized
from bench.engine.stage import evaluate_checkpoint
from bench.engine.subject import Subject
from bench.store import Store

DEFAULT_ATTACKS = ("fgsm", "pgd20=pgd:steps=20", "pgd100=pgd:steps=100", "pgd_cw=pgd:loss=cw,steps=30", "mim")


@dataclass(frozen=True)
class Check:
    """A stored sanity check: pass, warn, fail or not-run, and what it measured (one line)."""

    status: str
    summary: str


@dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation measured: accuracies in [0, 1] per attack label (`accuracy`) and clean,
    the `worst_case` (per-sample AND over clean and those attacks, on the samples all of them
    cover), the sanity checks stored for the model at this threat model, and the ids of the
    evaluations in the store ("clean" and each label). `checkpoint_id` and `sha256` identify the
    model in the store (see `bench.engine.subject`). Where the adaptive stage ran remedies:
    `adaptive_worst_case` (the same AND with the adaptive evaluations `adaptive_ids`, on
    `adaptive_n` samples) and per flagged check what its remedy did (`remedies`: "BPDA
    surrogate → 55.5% (closed)"); else None and empty."""

    name: str
    dataset: str
    threat: ThreatModel
    n_samples: int
    clean: float
    accuracy: dict[str, float]
    worst_case: float
    checks: dict[str, Check]
    evaluation_ids: dict[str, int]
    checkpoint_id: int
    sha256: str
    adaptive_worst_case: float | None = None
    adaptive_n: int | None = None
    adaptive_ids: dict[str, int] = field(default_factory=dict)
    remedies: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        lines = [f"EvaluationResult({self.name} on {self.dataset}, {self.threat}, {self.n_samples} samples; "
                 f"checkpoint {self.checkpoint_id}, sha256 {self.sha256[:12]})",
                 f"  {'clean':<12} {self.clean:7.2%}"]
        lines += [f"  {label:<12} {acc:7.2%}" for label, acc in self.accuracy.items()]
        lines.append(f"  {'worst case':<12} {self.worst_case:7.2%}  per-sample AND over clean and "
                     f"{len(self.accuracy)} attack(s)")
        if self.checks:
            counts = {s: [n for n, c in self.checks.items() if c.status == s] for s in ("pass", "warn", "fail", "not-run")}
            flagged = "; ".join(f"{s}: {', '.join(counts[s])}" for s in ("fail", "warn") if counts[s])
            lines.append(f"  {'checks':<12} {len(counts['pass'])} pass, {len(counts['warn'])} warn, "
                         f"{len(counts['fail'])} fail, {len(counts['not-run'])} not run" +
                         (f" ({flagged})" if flagged else ""))
        if self.adaptive_worst_case is not None:
            lines.append(f"  {'adaptive':<12} {self.adaptive_worst_case:7.2%}  worst case with "
                         f"{len(self.adaptive_ids)} adaptive attack(s)")
        lines += [f"  {'':<12} {name}: {what}" for name, what in self.remedies.items()]
        return "\n".join(lines)


def evaluate(model: nn.Module, *, dataset: str, threat: str | ThreatModel | None = None,
             attacks: Sequence[str | AttackSpec] | str | None = None, name: str | None = None,
             normalize: tuple | None = None, n_samples: int | None = None, db: str = "results.db",
             seed: int = 0, batch_size: int | str = "auto", device: str | torch.device | None = None,
             curves: bool = True, curve_samples: int = 200, sanity: bool = True, adaptive: bool = True,
             remedies: dict | None = None, data_dir: str | None = None,
             checkpoints: str | Path = "checkpoints", force: bool = False,
             log: Callable[[str], None] | None = None) -> EvaluationResult:
    """Evaluate `model`, any nn.Module taking pixels in [0, 1] (NCHW) and returning logits, as
    `bench eval` evaluates a checkpoint: clean, the `attacks`, the curves, the sanity checks, on
    the first `n_samples` of the dataset's fixed evaluation order (None: the whole test split),
    every result stored in `db` (a SQLite file or an SQLAlchemy URL) and shown by `bench report`.

    - `threat`: "Linf:8/255", "L2:0.5" or a ThreatModel (default: the dataset's);
    - `attacks`: specs as `bench eval --attack` takes them ("pgd20=pgd:steps=20") or AttackSpecs,
      norm and eps defaulting to `threat`; or a suite's name or file ("demo"), whose [attacks] run
      at `threat`; default: those of `bench eval`;
    - `name`: the model's name in the store and the report (default: its class name); with its
      weights it identifies the model (`bench.engine.subject`): evaluating the same weights under
      the same name again reuses the stored results;
    - `normalize`: (mean, std) of a model that expects normalized inputs, each a number or one per
      channel: the model then sees (x − mean) / std and eps stays in pixel units;
    - `batch_size`: samples per attack batch, each batch seeded from its first index ("auto": sized
      to the device, 256 on the CPU; see `bench.engine.evaluation.auto_batch_size`);
    - `curves`, `sanity`: compute the curves (on `curve_samples` samples) and the sanity checks;
    - `adaptive`: after the checks, run the remedies of the failed ones (`bench.remedies`: EOT,
      logit recovery, BPDA, stronger black-box attacks) and report the adaptive worst case;
      `remedies`: their budgets, {remedy name: {parameter: value}} (plus "warned": True to remedy
      warned checks too);
    - `log`: a function that gets one line per attack as it finishes (e.g. print); quiet by default.

    >>> import tempfile, torch, torch.nn as nn, atbench
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # digits are 1x8x8 pixels in [0, 1]
    >>> result = atbench.evaluate(model, dataset="digits", threat="Linf:0.1", name="linear",
    ...                           attacks=["fgsm", "pgd10=pgd:steps=10"], n_samples=40, curves=False,
    ...                           db=tempfile.mkdtemp() + "/results.db")
    >>> result  # doctest: +ELLIPSIS
    EvaluationResult(linear on digits, Linf eps=0.1, 40 samples; checkpoint 1, sha256 ...)
      clean ...
      fgsm ...
      pgd10 ...
      worst case ... per-sample AND over clean and 2 attack(s)
      checks ... pass, ... warn, ... fail, ... not run...
    >>> result.worst_case <= min(result.accuracy.values()) <= result.clean
    True
    >>> sorted(result.evaluation_ids)
    ['clean', 'fgsm', 'pgd10']
    """
    data = load_dataset(dataset, data_dir=data_dir)
    threat = parse_threat(threat, data)
    info = {"source": "python", "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
            "normalize": None}
    name = name or type(model).__name__
    if normalize is not None:
        info["normalize"] = channel_stats(normalize, data.input_shape[0])
        model = normalized(model, *info["normalize"])
    subject = Subject.external(model, name, data, threat, info=info)
    specs = attack_specs(attacks, threat)  # every input checked before the store is opened
    settings = adaptive_settings(remedies or {}, "remedies") if adaptive and sanity else None
    stage = dict(n_samples=n_samples, seed=seed, batch_size=batch_size, device=pick_device(device), force=force,
                 curves=curve_settings(curve_samples) if curves else None, sanity=sanity, adaptive=settings,
                 checkpoint_root=checkpoints, log=log or (lambda _: None))
    return run_evaluation(Store(db), subject, data, specs, **stage)


def run_evaluation(store: Store, subject: Subject, data: Dataset, specs: Sequence[AttackSpec],
                   **stage) -> EvaluationResult:
    """The evaluation stage (`evaluate_checkpoint`, keyword arguments `stage`) and its result."""
    report = evaluate_checkpoint(store, subject, data, specs, **stage)
    outcomes = report.outcomes
    worst, n = store.sample_matrix([o.evaluation_id for o in outcomes]).worst_case()
    checks, adaptive = {}, {}
    key = subject.threat.key
    if stage.get("sanity"):
        checks = {row.name: Check(row.status, row.summary or "") for row in store.stored_checks(report.checkpoint_id, key)}
    settings: AdaptiveSettings | None = stage.get("adaptive")
    remedied = {o.check: describe(o) for o in store.remedy_outcomes(report.checkpoint_id, key)
                if o.status != "none"} if settings is not None and stage.get("sanity") else {}
    if remedied:
        adaptive = {e.label: e.evaluation_id for e in store.attack_evaluations(report.checkpoint_id, key, role="adaptive")}
    adaptive_worst, adaptive_n = store.sample_matrix([o.evaluation_id for o in outcomes] + list(adaptive.values())
                                                     ).worst_case() if adaptive else (None, None)
    return EvaluationResult(subject.info.get("name") or Path(subject.path).name, data.name, subject.threat, n,
                            outcomes[0].robust_acc, {o.label: o.robust_acc for o in outcomes[1:]}, worst, checks,
                            {o.label: o.evaluation_id for o in outcomes}, report.checkpoint_id, subject.sha256,
                            adaptive_worst, adaptive_n, adaptive, remedied)


def parse_threat(threat: str | ThreatModel | None, data: Dataset) -> ThreatModel:
    """"NORM:EPS" ("Linf:8/255"), a ThreatModel, or None for the dataset's default."""
    if threat is None:
        return data.default_threat
    if isinstance(threat, ThreatModel):
        return threat
    norm, sep, eps = str(threat).partition(":")
    if not sep:
        raise BenchError(f"threat must be NORM:EPS, e.g. \"Linf:8/255\" or \"L2:0.5\", got {threat!r}")
    return ThreatModel(norm.strip(), parse_eps(eps.strip(), "threat eps"))


def parse_attack(text: str) -> AttackSpec:
    """`LABEL=NAME:key=value,key=value`, `NAME:key=value` or `NAME`."""
    from bench.core.config import parse_assignments

    label, sep, rest = text.partition("=")
    if not sep or ":" in label:
        label, rest = text.split(":", 1)[0], text
    name, _, args = rest.partition(":")
    return AttackSpec(label.strip(), name.strip(), parse_assignments([a for a in args.split(",") if a]))


def attack_specs(attacks: Sequence[str | AttackSpec] | str | None, threat: ThreatModel,
                 what: str = "the model") -> list[AttackSpec]:
    """Validated specs: the defaults of `bench eval` (None), a suite's [attacks] (a name or file),
    or a list of texts (`parse_attack`) and AttackSpecs; norm and eps default to `threat`."""
    if isinstance(attacks, (str, Path)):
        from bench.app.suite import suite_attacks

        return suite_attacks(attacks, threat)
    specs = []
    for item in attacks if attacks is not None else DEFAULT_ATTACKS:
        spec = parse_attack(item) if isinstance(item, str) else item
        params = dict(spec.params)
        params.setdefault("norm", threat.norm)
        if params["norm"] == threat.norm:
            params.setdefault("eps", threat.eps)
        elif "eps" not in params:
            raise BenchError(f"attack {spec.label!r} uses {params['norm']} but {what} is evaluated at {threat}: "
                             f"give its eps, e.g. {spec.attack}:norm=\"{params['norm']}\",eps=0.5")
        spec = AttackSpec(spec.label, spec.attack, params)
        spec.build()
        specs.append(spec)
    return specs


def channel_stats(normalize: tuple, channels: int) -> tuple[list[float], list[float]]:
    """(mean, std), each a number or `channels` numbers, as two lists of `channels` numbers."""
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise BenchError(f"normalize must be (mean, std), got {normalize!r}") from None
    out = []
    for values in (mean, std):
        values = [float(values)] * channels if isinstance(values, (int, float)) else [float(v) for v in values]
        if len(values) != channels:
            raise BenchError(f"normalize takes one number or {channels} (one per channel) for mean and std, "
                             f"got {normalize!r}")
        out.append(values)
    return out[0], out[1]


def curve_settings(n_samples: int) -> CurveSettings:
    from bench.core.config import build_config

    return build_config(CurveSettings, {"n_samples": n_samples}, "curves")


def pick_device(name: str | torch.device | None) -> torch.device:
    """A torch device: None picks cuda when available, else cpu; cuda asked for but unusable is a
    one-line error saying why (a CPU-only torch, or no GPU it can use) and how to run on the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"unknown device {name!r}; accepted: cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = f"this torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else \
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU (driver too old, or none visible)"
        raise BenchError(f"--device {name} was asked for, but CUDA is not available: {why}; to run on the CPU "
                         "anyway (far slower), use --device cpu (make bench DEVICE=cpu)")
    return device
