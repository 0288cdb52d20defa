"""Benchmark suites: TOML files naming a dataset, a threat model, a model, training settings,
the defenses to train and the attacks to evaluate every checkpoint with.

    name = "demo"
    dataset = "digits"
    seed = 0
    [threat]      norm = "Linf", eps = 0.2          (eps may be a fraction string: "8/255")
    [model]       name = "small_cnn", other keys are the model's parameters
    [training]    TrainConfig fields (epochs, batch_size, lr, schedule, ...)
    [evaluation]  n_samples, batch_size, seed, checkpoints = ["best", "last"], curves = true, sanity = true,
                  adaptive = true
    [curves]      CurveSettings fields (n_samples, eps, steps, restarts, ...); used when evaluation.curves
    [adaptive]    warned = false (remedy warned checks too); [adaptive.NAME]: a remedy's budgets
                  (bench.remedies); used when evaluation.sanity and evaluation.adaptive
    [defenses.LABEL]  defense = NAME (default LABEL), training = {overrides}, model = {overrides of [model]
                      parameters, or name = other architecture and its parameters}, other keys: parameters
    [defenses.LABEL.pretrained.NAME]  the training config (overrides of [training]) of the NAME run the
                      defense trains on demand (`ctx.pretrained`), instead of the defense's own
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

from bench.core.config import build_config, require, require_choice, tomllib
from bench.core.data import Dataset, load_dataset
from bench.core.errors import BenchError
from bench.core.planted import PLANTS
from bench.core.threat import ThreatModel, parse_eps
from bench.engine.adaptive import AdaptiveSettings, adaptive_settings
from bench.engine.curves import CurveSettings
from bench.engine.evaluation import AttackSpec, check_batch_size
from bench.engine.runspec import RunSpec, build_train_config

TOP_KEYS = ("name", "description", "dataset", "dataset_options", "seed", "threat", "model", "training",
            "evaluation", "curves", "adaptive", "defenses", "attacks", "planted")
CHECKPOINT_KINDS = ("best", "last")
SOURCE_SUITES = Path(__file__).resolve().parents[2] / "suites"  # the suites of a source checkout


@dataclass(frozen=True)
class EvalSettings:
    """How every checkpoint of a suite is evaluated: on the first `n_samples` of the test split
    (None: all), by `batch_size` ("auto": sized to the device, see
    `bench.engine.evaluation.auto_batch_size`), with `seed`; with the curves, the sanity checks and
    the adaptive stage (the remedies of flagged checks, after the checks) unless off."""

    n_samples: int | None = None
    batch_size: int | str = "auto"
    seed: int = 0
    checkpoints: tuple[str, ...] = ("best", "last")
    curves: bool = True
    sanity: bool = True
    adaptive: bool = True

    def __post_init__(self):
        check_batch_size(self.batch_size, "batch_size")
        require(self, at_least_one=("n_samples",), non_negative=("seed",))
        for kind in self.checkpoints:
            require_choice(kind, CHECKPOINT_KINDS, "checkpoint kind")


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
    adaptive: AdaptiveSettings | None = field(default_factory=AdaptiveSettings)


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
    if type(seed) is not int or seed < 0:
        raise BenchError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    for key in ("name", "description", "dataset"):
        if key in doc and not isinstance(doc[key], str):
            raise BenchError(f"{where}: {key} must be a string, got {doc[key]!r}")
    dataset_options = _table(doc, "dataset_options", where)

    defenses = _table(doc, "defenses", where)
    if not defenses:
        raise BenchError(f"{where} has no [defenses.NAME] table")
    runs = []
    for label, entry in defenses.items():
        if not isinstance(entry, dict):
            raise BenchError(f"{where}: defenses.{label} must be a table ([defenses.{label}] with its parameters), "
                             f"got {entry!r}")
        entry = dict(entry)
        overrides = entry.pop("training", {})
        model_over = dict(entry.pop("model", {}))
        dependencies = entry.pop("pretrained", {})
        if not all(isinstance(t, dict) for t in (overrides, model_over, dependencies)) or \
                not all(isinstance(t, dict) for t in dependencies.values()):
            raise BenchError(f"{where}: [defenses.{label}] training, model and pretrained.NAME must be tables")
        run_model = model_over.pop("name", None)
        spec = RunSpec(defense=entry.pop("defense", label), dataset=doc["dataset"], model=run_model or model,
                       threat=threat,
                       train=build_train_config({**train_defaults, **overrides}, f"{where} training of {label!r}"),
                       defense_params=entry, model_params=model_over if run_model else {**model_table, **model_over},
                       dataset_options=dataset_options, seed=seed, label=label,
                       pretrained_train={name: build_train_config({**train_defaults, **table},
                                                                  f"{where} training of {label!r}'s pretrained {name!r}")
                                         for name, table in dependencies.items()})
        spec.canonical()  # validates the defense name and parameters now
        runs.append(spec)

    attacks = parse_attacks(_table(doc, "attacks", where), threat, where)

    settings = build_config(EvalSettings, _table(doc, "evaluation", where), f"{where} [evaluation]")
    curves = build_config(CurveSettings, _table(doc, "curves", where), f"{where} [curves]") if settings.curves else None
    for kind in curves.checkpoints if curves else ():
        if kind not in CHECKPOINT_KINDS:
            raise BenchError(f"{where} [curves] checkpoints: unknown kind {kind!r}; accepted: {', '.join(CHECKPOINT_KINDS)}")
    adaptive = adaptive_settings(_table(doc, "adaptive", where), f"{where} [adaptive]") \
        if settings.sanity and settings.adaptive else None
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
                 threat=threat, runs=runs, attacks=attacks, evaluation=settings, curves=curves, planted=planted,
                 adaptive=adaptive)


def parse_attacks(table: dict, threat: ThreatModel, where: str = "suite") -> list[AttackSpec]:
    """A suite's [attacks.LABEL] tables as specs, norm and eps defaulting to `threat`; validated."""
    attacks = []
    for label, entry in table.items():
        if not isinstance(entry, dict):
            raise BenchError(f"{where}: attacks.{label} must be a table ([attacks.{label}] with its parameters), "
                             f"got {entry!r}")
        params = dict(entry)
        name = params.pop("attack", label)
        params.setdefault("norm", threat.norm)
        if "eps" not in params and params["norm"] != threat.norm:
            raise BenchError(f"{where} [attacks.{label}] uses {params['norm']} but the suite's threat model is "
                             f"{threat.norm}: give its eps (eps = ...)")
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


def load_suite_data(suite: Suite, data_dir: str | None = None) -> Dataset:
    return load_dataset(suite.dataset, data_dir=data_dir, **suite.dataset_options)
