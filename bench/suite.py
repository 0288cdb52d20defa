"""Benchmark suites: TOML files naming a dataset, a threat model, a model, training settings,
the defenses to train and the attacks to evaluate every checkpoint with.

    name = "demo"
    dataset = "digits"
    seed = 0
    [threat]      norm = "Linf", eps = 0.2          (eps may be a fraction string: "8/255")
    [model]       name = "small_cnn", other keys are the model's parameters
    [training]    TrainConfig fields (epochs, batch_size, lr, schedule, ...)
    [evaluation]  n_samples, batch_size, seed, checkpoints = ["best", "last"]
    [defenses.LABEL]  defense = NAME (default LABEL), training = {overrides}, other keys: parameters
    [attacks.LABEL]   attack = NAME (default LABEL), other keys: parameters (norm, eps default to [threat])

Every name and parameter is checked before any work starts.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.config import build_config
from bench.data import Dataset, load_dataset
from bench.errors import BenchError
from bench.evaluation import AttackSpec, evaluate_checkpoint
from bench.store import Store
from bench.threat import ThreatModel, parse_eps
from bench.trainer import RunSpec, build_train_config, train

TOP_KEYS = ("name", "description", "dataset", "dataset_options", "seed", "threat", "model", "training",
            "evaluation", "defenses", "attacks")
CHECKPOINT_KINDS = ("best", "last")


@dataclass(frozen=True)
class EvalSettings:
    n_samples: int | None = None
    batch_size: int = 256
    seed: int = 0
    checkpoints: tuple[str, ...] = ("best", "last")


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
        spec = RunSpec(defense=entry.pop("defense", label), dataset=doc["dataset"], model=model, threat=threat,
                       train=build_train_config({**train_defaults, **overrides}, f"{where} training of {label!r}"),
                       defense_params=entry, model_params=model_table, dataset_options=dataset_options, seed=seed,
                       label=label)
        spec.canonical()  # validates the defense name and parameters now
        runs.append(spec)

    attacks = []
    for label, entry in _table(doc, "attacks", where).items():
        params = dict(entry)
        name = params.pop("attack", label)
        params.setdefault("norm", threat.norm)
        params["eps"] = parse_eps(params.get("eps", threat.eps), f"attack {label!r} eps")
        spec = AttackSpec(label, name, params)
        spec.build()  # validates the attack name and parameters now
        attacks.append(spec)

    settings = build_config(EvalSettings, _table(doc, "evaluation", where), f"{where} [evaluation]")
    for kind in settings.checkpoints:
        if kind not in CHECKPOINT_KINDS:
            raise BenchError(f"{where} [evaluation] checkpoints: unknown kind {kind!r}; accepted: {', '.join(CHECKPOINT_KINDS)}")
    return Suite(name=doc.get("name", path.stem), path=path, dataset=doc["dataset"], dataset_options=dataset_options,
                 threat=threat, runs=runs, attacks=attacks, evaluation=settings)


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
    each requested checkpoint with every attack (skipping stored evaluations)."""
    summary = SuiteSummary()
    for spec in suite.runs:
        print(f"[{suite.name}] {spec.label}: train {spec.defense} ({spec.model}, {spec.train.epochs} epochs, "
              f"{spec.threat}) run {spec.run_id}", flush=True)
        result = train(spec, data, store=store, checkpoint_root=checkpoint_root, device=device, force=force,
                       progress=progress)
        if result.trained_now:
            summary.trained += 1
        else:
            summary.runs_cached += 1
            print("  already trained: skipped", flush=True)
        for kind in suite.evaluation.checkpoints:
            path = result.directory / f"{kind}.pt"
            print(f"[{suite.name}] {spec.label}: evaluate {kind}.pt", flush=True)
            outcomes = evaluate_checkpoint(store, path, data, suite.attacks, n_samples=suite.evaluation.n_samples,
                                           seed=suite.evaluation.seed, batch_size=suite.evaluation.batch_size,
                                           device=device, force=force)
            new = sum(not o.cached for o in outcomes)
            summary.evaluated += new
            summary.evaluations_cached += len(outcomes) - new
            if new == 0:
                print(f"  all {len(outcomes)} evaluations already stored: skipped", flush=True)
    return summary

