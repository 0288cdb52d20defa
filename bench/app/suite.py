"""Benchmark suites: TOML files naming a dataset, a threat model, a model, training settings,
the defenses to train and the attacks to evaluate every checkpoint with.

    name = "demo"
    dataset = "digits"
    seed = 0
    [threat]      norm = "Linf", eps = 0.2          (eps may be a fraction string: "8/255")
    [model]       name = "small_cnn", other keys are the model's parameters
    [training]    TrainConfig fields (epochs, batch_size, lr, schedule, ...)
    [evaluation]  n_samples, batch_size, seed, checkpoints = ["best", "last"], curves = true, sanity = true
    [curves]      CurveSettings fields (n_samples, eps, steps, restarts, ...); used when evaluation.curves
    [defenses.LABEL]  defense = NAME (default LABEL), training = {overrides}, model = {overrides of [model]
                      parameters, or name = other architecture and its parameters}, other keys: parameters
    [attacks.LABEL]   attack = NAME (default LABEL), other keys: parameters (norm, eps default to [threat])
    [planted.LABEL]   from = a defense LABEL, kind = a plant of bench.core.planted, checkpoint = "best" | "last":
                      that checkpoint wrapped by a planted failure, evaluated like the others (sanity demo)

Every name and parameter is checked before any work starts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch

from bench.core.config import build_config
from bench.core.data import Dataset, load_dataset
from bench.core.errors import BenchError
from bench.core.planted import PLANTS
from bench.core.threat import ThreatModel, parse_eps
from bench.engine.checkpoint import load_model, plant, sha256_file
from bench.engine.curves import CurveSettings
from bench.engine.evaluation import AttackSpec
from bench.engine.provenance import provenance
from bench.engine.runspec import RunSpec, build_train_config
from bench.engine.stage import evaluate_checkpoint
from bench.engine.trainer import train
from bench.store import Store

TOP_KEYS = ("name", "description", "dataset", "dataset_options", "seed", "threat", "model", "training",
            "evaluation", "curves", "defenses", "attacks", "planted")
CHECKPOINT_KINDS = ("best", "last")
SOURCE_SUITES = Path(__file__).resolve().parents[2] / "suites"  # the suites of a source checkout


@dataclass(frozen=True)
class EvalSettings:
    """How every checkpoint of a suite is evaluated: on the first `n_samples` of the test split
    (None: all), by `batch_size`, with `seed`; with the curves and the sanity checks unless off."""

    n_samples: int | None = None
    batch_size: int = 256
    seed: int = 0
    checkpoints: tuple[str, ...] = ("best", "last")
    curves: bool = True
    sanity: bool = True


@dataclass(frozen=True)
class PlantSpec:
    label: str
    source: str     # a defense label of the suite
    kind: str       # a key of bench.core.planted.PLANTS
    checkpoint: str = "best"


@dataclass
class Suite:
    name: str
    path: Path
    dataset: str
    dataset_options: dict
    threat: ThreatModel
    runs: list[RunSpec]
    attacks: list[AttackSpec]
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    curves: CurveSettings | None = field(default_factory=CurveSettings)
    planted: list[PlantSpec] = field(default_factory=list)


def _check_keys(table: dict, allowed, where: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise BenchError(f"unknown key {key!r} in {where}.{hint} Accepted: {', '.join(allowed)}")


def _table(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise BenchError(f"{where}: [{key}] must be a table, got {value!r}")
    return dict(value)


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        known = sorted(p.name for p in Path("suites").glob("*.toml")) if Path("suites").is_dir() else []
        raise BenchError(f"suite file {str(path)!r} not found" + (f"; suites here: {', '.join(known)}" if known else ""))
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"suite {str(path)!r} is not valid TOML: {exc}") from None
    return parse_suite(doc, path)


def parse_suite(doc: dict[str, Any], path: Path) -> Suite:
    where = f"suite {str(path)!r}"
    _check_keys(doc, TOP_KEYS, where)
    if "dataset" not in doc:
        raise BenchError(f"{where} must name a dataset (dataset = \"digits\")")
    threat_table = _table(doc, "threat", where)
    _check_keys(threat_table, ("norm", "eps"), f"{where} [threat]")
    if "eps" not in threat_table:
        raise BenchError(f"{where} [threat] must give eps")
    threat = ThreatModel(threat_table.get("norm", "Linf"), parse_eps(threat_table["eps"], "[threat] eps"))
    model_table = _table(doc, "model", where)
    model = model_table.pop("name", "small_cnn")
    train_defaults = _table(doc, "training", where)
    seed = doc.get("seed", 0)
    dataset_options = _table(doc, "dataset_options", where)

    defenses = _table(doc, "defenses", where)
    if not defenses:
        raise BenchError(f"{where} has no [defenses.NAME] table")
    runs = []
    for label, entry in defenses.items():
        entry = dict(entry)
        overrides = entry.pop("training", {})
        model_over = dict(entry.pop("model", {}))
        if not isinstance(overrides, dict) or not isinstance(model_over, dict):
            raise BenchError(f"{where}: [defenses.{label}] training and model must be tables")
        run_model = model_over.pop("name", None)
        spec = RunSpec(defense=entry.pop("defense", label), dataset=doc["dataset"], model=run_model or model,
                       threat=threat,
                       train=build_train_config({**train_defaults, **overrides}, f"{where} training of {label!r}"),
                       defense_params=entry, model_params=model_over if run_model else {**model_table, **model_over},
                       dataset_options=dataset_options, seed=seed, label=label)
        spec.canonical()  # validates the defense name and parameters now
        runs.append(spec)

    attacks = parse_attacks(_table(doc, "attacks", where), threat)

    settings = build_config(EvalSettings, _table(doc, "evaluation", where), f"{where} [evaluation]")
    curves = build_config(CurveSettings, _table(doc, "curves", where), f"{where} [curves]") if settings.curves else None
    for table, kinds in (("[evaluation]", settings.checkpoints), ("[curves]", curves.checkpoints if curves else ())):
        for kind in kinds:
            if kind not in CHECKPOINT_KINDS:
                raise BenchError(f"{where} {table} checkpoints: unknown kind {kind!r}; accepted: "
                                 f"{', '.join(CHECKPOINT_KINDS)}")
    planted = []
    for label, entry in _table(doc, "planted", where).items():
        _check_keys(entry, ("from", "kind", "checkpoint"), f"{where} [planted.{label}]")
        spec = PlantSpec(label, entry.get("from", ""), entry.get("kind", ""), entry.get("checkpoint", "best"))
        if spec.source not in defenses:
            raise BenchError(f"{where} [planted.{label}] from = {spec.source!r} is not a defense of the suite; "
                             f"accepted: {', '.join(defenses)}")
        if spec.kind not in PLANTS or spec.checkpoint not in CHECKPOINT_KINDS:
            raise BenchError(f"{where} [planted.{label}] needs kind in {', '.join(PLANTS)} and checkpoint in "
                             f"{', '.join(CHECKPOINT_KINDS)}; got {spec.kind!r}, {spec.checkpoint!r}")
        planted.append(spec)
    return Suite(name=doc.get("name", path.stem), path=path, dataset=doc["dataset"], dataset_options=dataset_options,
                 threat=threat, runs=runs, attacks=attacks, evaluation=settings, curves=curves, planted=planted)


def parse_attacks(table: dict, threat: ThreatModel) -> list[AttackSpec]:
    """A suite's [attacks.LABEL] tables as specs, norm and eps defaulting to `threat`; validated."""
    attacks = []
    for label, entry in table.items():
        params = dict(entry)
        name = params.pop("attack", label)
        params.setdefault("norm", threat.norm)
        params["eps"] = parse_eps(params.get("eps", threat.eps), f"attack {label!r} eps")
        spec = AttackSpec(label, name, params)
        spec.build()  # validates the attack name and parameters now
        attacks.append(spec)
    return attacks


def find_suite(name: str | Path) -> Path:
    """A suite file: `name` itself when it is a file, else `suites/NAME.toml` here or in the source tree."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in (Path("suites"), SOURCE_SUITES):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in (Path("suites"), SOURCE_SUITES) if folder.is_dir()
                    for p in folder.glob("*.toml")})
    raise BenchError(f"no suite {str(name)!r}" + (f"; suites: {', '.join(known)}" if known else ""))


def suite_attacks(name: str | Path, threat: ThreatModel) -> list[AttackSpec]:
    """The [attacks] of a suite (a name or a file), norm and eps defaulting to `threat` instead of
    the suite's own threat model."""
    path = find_suite(name)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"suite {str(path)!r} is not valid TOML: {exc}") from None
    return parse_attacks(_table(doc, "attacks", f"suite {str(path)!r}"), threat)


@dataclass
class SuiteSummary:
    trained: int = 0
    runs_cached: int = 0
    evaluated: int = 0
    evaluations_cached: int = 0

    @property
    def did_work(self) -> bool:
        return bool(self.trained or self.evaluated)


def load_suite_data(suite: Suite, data_dir: str | None = None) -> Dataset:
    return load_dataset(suite.dataset, data_dir=data_dir, **suite.dataset_options)


def run_suite(suite: Suite, data: Dataset, *, store: Store, checkpoint_root: str | Path = "checkpoints",
              device: torch.device | str = "cpu", force: bool = False, progress: bool = True) -> SuiteSummary:
    """Train every defense of the suite (resuming or skipping finished runs), then evaluate
    each requested checkpoint with every attack (skipping stored evaluations); then the planted ones."""
    summary = SuiteSummary()
    directories = {}
    for spec in suite.runs:
        print(f"[{suite.name}] {spec.label}: train {spec.defense} ({spec.model}, {spec.train.epochs} epochs, "
              f"{spec.threat}) run {spec.run_id}", flush=True)
        result = train(spec, data, store=store, checkpoint_root=checkpoint_root, device=device, force=force,
                       progress=progress)
        directories[spec.label] = (spec.run_id, result.directory)
        if result.trained_now:
            summary.trained += 1
        else:
            summary.runs_cached += 1
            print("  already trained: skipped", flush=True)
        for kind in suite.evaluation.checkpoints:
            print(f"[{suite.name}] {spec.label}: evaluate {kind}.pt", flush=True)
            _evaluate(suite, data, store, result.directory / f"{kind}.pt", summary, device, force, checkpoint_root,
                      curves=suite.curves is not None and kind in suite.curves.checkpoints)
    for p in suite.planted:
        run_id, directory = directories[p.source]
        path = directory / f"planted-{p.kind}.pt"
        print(f"[{suite.name}] {p.label}: {p.source}'s {p.checkpoint}.pt planted with {p.kind}", flush=True)
        if force or not path.exists():
            plant(directory / f"{p.checkpoint}.pt", p.kind, path)
        store.register_checkpoint(sha256_file(path), str(path),
                                  provenance(torch.device(device), {"plant": p.kind, "from": p.checkpoint}, 0),
                                  run_id=run_id, epoch=load_model(path)[1]["epoch"], kind=f"planted-{p.kind}")
        _evaluate(suite, data, store, path, summary, device, force, checkpoint_root, curves=suite.curves is not None)
    return summary


def _evaluate(suite: Suite, data: Dataset, store: Store, path: Path, summary: SuiteSummary, device, force: bool,
              checkpoint_root, curves: bool) -> None:
    report = evaluate_checkpoint(store, path, data, suite.attacks, n_samples=suite.evaluation.n_samples,
                                 seed=suite.evaluation.seed, batch_size=suite.evaluation.batch_size,
                                 device=device, force=force, curves=suite.curves if curves else None,
                                 sanity=suite.evaluation.sanity, checkpoint_root=checkpoint_root)
    summary.evaluated += report.computed
    summary.evaluations_cached += sum(o.cached for o in report.outcomes)
    if report.computed == 0:
        print(f"  all {len(report.outcomes)} evaluations already stored: skipped", flush=True)

