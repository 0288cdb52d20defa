"""From flag to fix, end to end on the synthetic set (`planted_bench` in conftest): every planted
failure of a PGD-trained tiny model is flagged by its check (test_sanity.py), the adaptive stage
runs the remedy that answers it and closes the flag, and the adaptive worst case comes back near
the base model's worst case; honest models run no remedy."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import FIX, HONEST, PLANTED_EPS

from bench.core.attack import ATTACKS
from bench.core.check import CHECKS
from bench.core.remedy import REMEDIES
from bench.core.stats import paired_difference
from bench.core.threat import ThreatModel
from bench.engine.checkpoint import sha256_file

THREAT = ThreatModel("Linf", PLANTED_EPS)


def _checkpoint(store, path) -> int:
    return store.checkpoint_by_sha(sha256_file(path)).checkpoint_id


def robust(store, path, adaptive: bool):
    """(sample indices, per-sample robustness) under the suite's attacks (and the adaptive ones)."""
    cid = _checkpoint(store, path)
    ids = [e.evaluation_id for e in store.attack_evaluations(cid, THREAT.key)] + [store.clean_evaluation(cid).evaluation_id]
    if adaptive:
        ids += [e.evaluation_id for e in store.attack_evaluations(cid, THREAT.key, role="adaptive")]
    m = store.sample_matrix(ids)
    return m.index, m.correct.all(axis=1)


@pytest.mark.parametrize("name", HONEST)
def test_honest_models_run_no_remedy(planted_bench, name):
    store, paths = planted_bench
    cid = _checkpoint(store, paths[name])
    assert store.remedy_outcomes(cid, THREAT.key) == []
    assert store.attack_evaluations(cid, THREAT.key, role="adaptive") == []


@pytest.mark.parametrize("kind", sorted(FIX))
def test_the_remedy_closes_the_flag_and_recovers_the_base_worst_case(planted_bench, kind):
    """The flag's outcome is "closed" by the expected remedy, and the adaptive worst case is not
    significantly above the unwrapped PGD-trained model's worst case: the 95% paired interval of
    their difference (same samples, Newcombe) reaches 0 or below. (A wrapper can make the model
    less robust than its base, so the adaptive worst case may lie below it.)"""
    store, paths = planted_bench
    check, remedy = FIX[kind]
    outcome = {o.check: o for o in store.remedy_outcomes(_checkpoint(store, paths[kind]), THREAT.key)}[check]
    assert (outcome.status, outcome.closed_by) == ("closed", remedy), outcome.remedies
    index, base = robust(store, paths["pgd_at"], adaptive=False)
    same, adaptive = robust(store, paths[kind], adaptive=True)
    assert (index == same).all()
    _, lower, upper = paired_difference(adaptive, base)
    assert lower <= 0, (base.mean(), adaptive.mean(), lower, upper)


SUITE_EXTRA = """
[planted.softmax]
from = "pgd_at"
kind = "softmax"
[adaptive.logit_recovery]
steps = 10
n_target_classes = 3
"""


def test_a_suite_runs_the_adaptive_stage_as_one_job_per_checkpoint(tmp_path, monkeypatch, capsys):
    """`bench run` of a suite with a planted softmax: an adaptive job per checkpoint after its checks;
    the planted one runs logit recovery and closes its flag; a second run has nothing to do; `bench
    eval` prints the adaptive worst case and what answered each flag, `--no-adaptive` neither."""
    from bench.app.cli import main

    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "suite.toml"
    suite.write_text((Path(__file__).parent / "suites" / "tiny.toml").read_text() + SUITE_EXTRA)
    assert main(["run", "--suite", str(suite), "--device", "cpu", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"adaptive +logits_not_probabilities: logit recovery → \d+\.\d% \(closed\)", out), out
    assert main(["plan", "--suite", str(suite), "--no-report", "--json"]) == 0
    jobs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    adaptive = [j for j in jobs if j["kind"] == "adaptive"]
    assert len(adaptive) == 7 and all(j["state"] == "done" for j in jobs)  # 3 runs × best, last; 1 planted
    assert all(len(j["depends_on"]) == 1 and j["depends_on"][0].startswith("checks:") for j in adaptive)
    assert main(["run", "--suite", str(suite), "--device", "cpu", "--no-report"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    with monkeypatch.context() as m:  # a remedy's new revision makes its outcomes stale: the stage runs again
        m.setattr(REMEDIES.get("logit_recovery"), "revision", REMEDIES.get("logit_recovery").revision + 1)
        assert main(["run", "--suite", str(suite), "--device", "cpu", "--no-report"]) == 0
        out = capsys.readouterr().out
        assert "logit_recovery:apgd_ce" in out and "stored)" not in out.split("logit_recovery:apgd_ce")[1].splitlines()[0]
        assert re.search(r"adaptive +logits_not_probabilities: logit recovery → \d+\.\d% \(closed\)", out), out
    with monkeypatch.context() as m:  # a check's new revision: the checks jobs run again and recompute it
        m.setattr(CHECKS.get("restarts_saturate"), "revision", CHECKS.get("restarts_saturate").revision + 1)
        assert main(["run", "--suite", str(suite), "--device", "cpu", "--no-report"]) == 0
        assert "nothing to do" not in capsys.readouterr().out
        with sqlite3.connect(tmp_path / "results.db") as db:
            assert db.execute("SELECT DISTINCT revision FROM sanity_checks WHERE name = 'restarts_saturate'"
                              ).fetchall() == [(CHECKS.get("restarts_saturate").revision,)]
    with monkeypatch.context() as m:  # an attack's new revision: its evaluations (suite and curves) are recomputed
        m.setattr(ATTACKS.get("fgsm"), "revision", 7)
        assert main(["run", "--suite", str(suite), "--device", "cpu", "--no-report"]) == 0
        out = capsys.readouterr().out
        assert "nothing to do" not in out
        assert len(re.findall(r"^\[job \d+\] checks ", out, re.M)) == 7, out  # downstream of the new results
        with sqlite3.connect(tmp_path / "results.db") as db:
            count = {r: dict(db.execute("SELECT role, COUNT(*) FROM evaluations WHERE attack = 'fgsm' AND "
                                        "implementation LIKE ? GROUP BY role", (f"% r{r}",)).fetchall()) for r in (1, 7)}
        assert count[7] == count[1] and count[1]["curve"] == 2 * count[1]["attack"] >= 12, count  # eps 0.1 and 0.4
    planted = next(tmp_path.glob("checkpoints/*/planted-softmax.pt"))
    argv = ["eval", str(planted), "--attack", "pgd10=pgd:steps=10", "--n-samples", "48", "--device", "cpu",
            "--no-curves", "--remedy", "logit_recovery:steps=10,n_target_classes=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"adaptive worst case +\d+\.\d\d%", out) and "logits_not_probabilities: logit recovery →" in out
    assert main(argv + ["--no-adaptive"]) == 0
    out = capsys.readouterr().out
    assert "adaptive worst case" not in out and "logit recovery" not in out and "FAIL logits_not_probabilities" in out
