"""Every suite file (suites/*.toml and the test suites) loads: each defense, attack, model and dataset
name and each parameter resolves against its config (as `bench run` checks before any work), the
pretrained runs a defense trains on demand and a transfer attack's surrogate resolve too, and the
schedules written as fractions agree with each run's epochs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench.app.suite import load_suite
from bench.core.config import tomllib
from bench.core.defense import DEFENSES
from bench.core.models import model_params
from bench.engine.pretrained import Pretrained

ROOT = Path(__file__).resolve().parent.parent
SUITES = sorted((ROOT / "suites").glob("*.toml")) + sorted((ROOT / "tests" / "suites").glob("*.toml"))


def test_the_suites_are_found():
    assert {"cifar10.toml", "cifar10_defenses.toml", "demo.toml"} <= {p.name for p in SUITES}


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_every_name_and_parameter_resolves(path):
    doc = tomllib.loads(path.read_text())
    suite = load_suite(path)  # defense, model, dataset: RunSpec.canonical(); attacks: AttackSpec.build()
    assert [run.label for run in suite.runs] == list(doc["defenses"])
    assert [spec.label for spec in suite.attacks] == list(doc.get("attacks", {}))
    for run in suite.runs:
        for name in list(DEFENSES.get(run.defense).pretrained_defenses) + list(run.pretrained_train):
            DEFENSES.get(name)
    for spec in suite.attacks:
        config = spec.build().config
        if hasattr(config, "surrogate_model"):
            model_params(config.surrogate_model, config.surrogate_model_params)


def written_fractions(values) -> list[tuple[float, float]]:
    """(numerator, denominator) of the "a/b" strings among `values`."""
    return [tuple(float(part) for part in v.split("/")) for v in values if isinstance(v, str) and "/" in v]


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_schedule_fractions_agree_with_the_epochs(path):
    """A piecewise schedule's milestones lie strictly inside training, increasing. A fraction written
    as epoch/total ("60/120", in milestones or in a defense's *_fraction parameter) has the run's
    epochs as its total, so the switch falls at the epoch the comment names; small denominators
    ("1/2", "3/4") are plain fractions."""
    doc = tomllib.loads(path.read_text())
    for run in load_suite(path).runs:
        entry = doc["defenses"][run.label]
        written = [v for key, v in entry.items() if key.endswith("_fraction")]
        if run.train.schedule == "piecewise":
            milestones = run.train.milestones
            assert all(0 < m < 1 for m in milestones) and list(milestones) == sorted(set(milestones)), run.label
            written += entry.get("training", {}).get("milestones", doc.get("training", {}).get("milestones", []))
        for numerator, total in written_fractions(written):
            assert total <= 4 or total == run.train.epochs, (run.label, f"{numerator:g}/{total:g}", run.train.epochs)


def test_tat_dra_starts_from_the_suites_natural_run():
    """In cifar10_defenses.toml TAT-DRA's natural start has the natural recipe: it is the very run of
    [defenses.natural] (trained once), not one with TAT's 60-epoch fine-tuning config; the thesis'
    PGD-20 (step eps/20) at 2, 5 and 8 /255 evaluates every checkpoint."""
    suite = load_suite(ROOT / "suites" / "cifar10_defenses.toml")
    runs = {run.label: run for run in suite.runs}
    tat = runs["tat_dra"]
    pretrained = Pretrained(SimpleNamespace(name=suite.dataset, options=suite.dataset_options), None, ROOT,
                            torch.device("cpu"), tat.threat, tat.model, tat.model_params, tat.train, tat.seed,
                            trainer=None, dependency_train=tat.pretrained_train)
    assert pretrained.spec("natural").run_id == runs["natural"].run_id
    assert tat.train.epochs == 60 and runs["natural"].train.epochs == 200
    pgd20 = {spec.label: spec.build().config for spec in suite.attacks if spec.label.startswith("pgd20_eps")}
    assert sorted(round(c.eps * 255, 6) for c in pgd20.values()) == [2, 5, 8]
    assert all(c.steps == 20 and c.step_size == pytest.approx(c.eps / 20) for c in pgd20.values())


def test_the_cifar10_suite_runs_a_standalone_fab():
    """`make bench` reads FAB's own minimum-norm distances, not only FAB-T inside AutoAttack."""
    attacks = {spec.label: spec.build() for spec in load_suite(ROOT / "suites" / "cifar10.toml").attacks}
    assert attacks["fab"].name == "fab" and attacks["fab"].minimum_norm and "autoattack" in attacks
