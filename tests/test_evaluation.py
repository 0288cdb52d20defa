"""bench.engine.evaluation on a really trained tiny checkpoint: per-sample rows, caching, --force,
the per-sample worst case, threat-model checks on attacks, model mode, determinism, and
what a failure leaves in the store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

import bench.engine.evaluation as evaluation
from bench.core.attack import ATTACKS, Attack
from bench.core.data import eval_indices, load_dataset
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.checkpoint import load_model, sha256_file
from bench.engine.evaluation import AttackSpec, run_attack
from bench.engine.runspec import RunSpec, build_train_config
from bench.engine.stage import evaluate_checkpoint
from bench.engine.trainer import train
from bench.store import Store
from bench.store.schema import Evaluation, SampleResult

OPTIONS = {"n_train": 128, "n_val": 32, "n_test": 48}
EPS = 0.1
N_TEST = OPTIONS["n_test"]
SPECS = [AttackSpec("fgsm", "fgsm", {"eps": EPS}), AttackSpec("pgd5", "pgd", {"eps": EPS, "steps": 5})]


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", **OPTIONS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data) -> Path:
    """best.pt of a natural run, 3 epochs on the tiny synthetic set: clean accuracy well above
    chance and attacks that fool it on different samples. Read-only for the tests."""
    root = tmp_path_factory.mktemp("trained")
    spec = RunSpec(defense="natural", dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", EPS),
                   train=build_train_config({"epochs": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.003,
                                             "weight_decay": 0.0, "val_steps": 3}),
                   dataset_options=OPTIONS, seed=0, label="natural")
    result = train(spec, data, store=Store(str(root / "train.db")), checkpoint_root=root / "checkpoints",
                   progress=False)
    return result.directory / "best.pt"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return Store(str(tmp_path / "results.db"))


def quiet(_):
    pass


def stored(store: Store) -> dict[int, dict]:
    """evaluation_id -> the evaluation's columns plus `samples`: [(index, correct, norm)]."""
    with store.session() as s:
        out = {}
        for ev in s.scalars(select(Evaluation).order_by(Evaluation.evaluation_id)):
            row = {c.key: getattr(ev, c.key) for c in Evaluation.__table__.columns}
            row["samples"] = [(r.sample_index, r.correct, r.perturbation_norm) for r in ev.samples]
            out[ev.evaluation_id] = row
        return out


def count(store: Store, table) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(table))


# --------------------------------------------------------------------------- rows

def test_rows_hold_per_sample_results_for_every_index(store, checkpoint, data):
    outcomes = evaluate_checkpoint(store, checkpoint, data, SPECS, log=quiet).outcomes
    assert [(o.label, o.attack, o.cached) for o in outcomes] == \
        [("clean", "clean", False), ("fgsm", "fgsm", False), ("pgd5", "pgd", False)]
    rows = stored(store)
    assert sorted(rows) == sorted(o.evaluation_id for o in outcomes)
    sha = sha256_file(checkpoint)
    model, _ = load_model(checkpoint)
    with torch.no_grad():
        clean_correct = (model(data.test_x).argmax(1) == data.test_y).tolist()
    for o in outcomes:
        row = rows[o.evaluation_id]
        assert [i for i, _, _ in row["samples"]] == list(range(N_TEST))
        correct = [c for _, c, _ in row["samples"]]
        assert row["n_samples"] == o.n_samples == N_TEST
        assert row["n_correct"] == sum(correct)
        assert row["robust_acc"] == o.robust_acc == pytest.approx(sum(correct) / N_TEST)
        assert store.checkpoint(row["checkpoint_id"]).sha256 == sha
        assert row["dataset"] == "synthetic" and row["seed"] == 0
        assert row["label"] == o.label and row["attack"] == o.attack and row["implementation"] == (
            "atbench" if o.attack == "clean" else f"atbench r{ATTACKS.get(o.attack).revision_id()}")
        assert (row["forward_passes"], row["backward_passes"]) == (o.forward_passes, o.backward_passes)
        assert row["versions"].get("torch") == torch.__version__ and row["device"].startswith("cpu")
        assert row["config"]["attack"] == o.attack and row["created_at"] is not None
        assert {k: row["config"][k] for k in ("batch_size", "precision", "channels_last")} == \
            {"batch_size": evaluation.CPU_BATCH, "precision": "fp32", "channels_last": False}  # "auto" on the CPU
    clean, fgsm, pgd = (rows[o.evaluation_id] for o in outcomes)
    assert [c for _, c, _ in clean["samples"]] == clean_correct
    assert clean["norm"] is None and clean["eps"] is None and all(n is None for _, _, n in clean["samples"])
    assert 0.6 <= clean["robust_acc"] < 1  # the fixture really learned something
    for row in (fgsm, pgd):
        assert (row["norm"], row["eps"]) == ("Linf", EPS)
        assert all(0 <= n <= EPS + 1e-6 for _, _, n in row["samples"])
        assert row["robust_acc"] < clean["robust_acc"]  # the attacks do something
    # pass counting per sample: clean 1 forward; FGSM 1 gradient + 1 check; PGD-5 5 gradients + 1 check
    assert (clean["forward_passes"], clean["backward_passes"]) == (N_TEST, 0)
    assert (fgsm["forward_passes"], fgsm["backward_passes"]) == (2 * N_TEST, N_TEST)
    assert (pgd["forward_passes"], pgd["backward_passes"]) == (6 * N_TEST, 5 * N_TEST)
    assert pgd["config"]["params"]["steps"] == 5 and fgsm["config"]["checkpoint"] == str(checkpoint)


def test_a_sample_subset_is_recorded(store, checkpoint, data):
    outcomes = evaluate_checkpoint(store, checkpoint, data, SPECS[:1], n_samples=20, log=quiet).outcomes
    want = eval_indices(N_TEST, 20)
    assert len(want) == 20 and want != list(range(20))
    for row in stored(store).values():
        assert [i for i, _, _ in row["samples"]] == want and row["n_samples"] == 20
    # a different subset is a different evaluation, not a cache hit
    more = evaluate_checkpoint(store, checkpoint, data, SPECS[:1], n_samples=30, log=quiet).outcomes
    assert not any(o.cached for o in more)
    assert count(store, Evaluation) == 4 and {o.evaluation_id for o in outcomes}.isdisjoint(
        {o.evaluation_id for o in more})


# --------------------------------------------------------------------------- caching and force

def test_second_call_is_cached_and_force_reruns(store, checkpoint, data, monkeypatch):
    first = evaluate_checkpoint(store, checkpoint, data, SPECS, log=quiet).outcomes
    before = stored(store)

    def no_work(*args, **kwargs):
        raise AssertionError("an attack ran although its evaluation is stored")

    monkeypatch.setattr(evaluation, "run_attack", no_work)
    logged = []
    second = evaluate_checkpoint(store, checkpoint, data, SPECS, log=logged.append).outcomes
    assert [o.cached for o in second] == [True, True, True] and logged == []
    assert [(o.evaluation_id, o.robust_acc, o.forward_passes, o.backward_passes) for o in second] == \
        [(o.evaluation_id, o.robust_acc, o.forward_passes, o.backward_passes) for o in first]
    assert stored(store) == before  # nothing rewritten, created_at included

    calls = []

    def spy(model, attack, x, y, batch_size, seed=None, **kwargs):
        calls.append(None if attack is None else attack.name)
        return run_attack(model, attack, x, y, batch_size, seed, **kwargs)

    monkeypatch.setattr(evaluation, "run_attack", spy)
    third = evaluate_checkpoint(store, checkpoint, data, SPECS, force=True, log=quiet).outcomes
    assert calls == [None, "fgsm", "pgd"] and not any(o.cached for o in third)
    after = stored(store)
    assert len(after) == 3 and count(store, SampleResult) == 3 * N_TEST  # replaced, not added
    old = sorted(before.values(), key=lambda r: r["label"])
    new = sorted(after.values(), key=lambda r: r["label"])
    for a, b in zip(old, new):
        assert b["created_at"] > a["created_at"]
        assert b["samples"] == a["samples"]  # and deterministic


# --------------------------------------------------------------------------- adversarial examples

def test_attack_evaluations_keep_the_first_fooled_samples_images(store, checkpoint, data, monkeypatch):
    monkeypatch.setattr(evaluation, "EXAMPLES_PER_EVALUATION", 3)
    outcomes = evaluate_checkpoint(store, checkpoint, data, SPECS, log=quiet).outcomes
    indices = eval_indices(N_TEST, None)
    clean_id, pgd_id = outcomes[0].evaluation_id, outcomes[2].evaluation_id
    samples = store.sample_results([pgd_id])[pgd_id]
    fooled = [int(i) for i, ok in zip(samples[0], samples[1]) if not ok]
    assert len(fooled) > 3
    kept = store.adversarial_examples([clean_id, pgd_id], indices)
    assert [e.evaluation_id for e in kept] == [pgd_id] * 3   # clean keeps none; an attack at most 3
    assert [e.sample_index for e in kept] == sorted(fooled, key=indices.index)[:3]
    model, _ = load_model(checkpoint)
    for e in kept:
        clean = torch.frombuffer(bytearray(e.clean), dtype=torch.float16).float().view(e.channels, e.height, e.width)
        adv = torch.frombuffer(bytearray(e.adversarial), dtype=torch.float16).float().view(clean.shape)
        assert torch.allclose(clean, data.test_x[e.sample_index], atol=1e-3)
        assert e.label == int(data.test_y[e.sample_index]) and e.predicted != e.label
        assert (adv - clean).abs().max() <= EPS + 1e-3 and (adv - clean).abs().max() > 0
        assert int(model(adv[None]).argmax()) == e.predicted   # the stored point still fools the model


def test_curve_points_keep_no_images(store, checkpoint, data):
    from bench.engine.curves import CurveSettings

    curves = CurveSettings(n_samples=24, eps=[0.1, 0.4], eps_steps=2, steps=[1, 5], restarts=[1, 2], restart_steps=3)
    evaluate_checkpoint(store, checkpoint, data, [], curves=curves, log=quiet)
    with store.session() as s:
        roles = dict(s.execute(select(Evaluation.evaluation_id, Evaluation.role)).all())
    assert "curve" in roles.values()
    kept = store.adversarial_examples(list(roles), range(N_TEST))
    assert kept == []


# --------------------------------------------------------------------------- worst case

def test_worst_case_is_the_per_sample_and(store, checkpoint, data):
    outcomes = evaluate_checkpoint(store, checkpoint, data, SPECS, log=quiet).outcomes
    ids = [o.evaluation_id for o in outcomes]
    rows = stored(store)
    by_hand = [all(dict((i, c) for i, c, _ in rows[e]["samples"])[i] for e in ids) for i in range(N_TEST)]
    acc, n = store.sample_matrix(ids).worst_case()
    assert n == N_TEST
    assert acc == pytest.approx(sum(by_hand) / N_TEST)
    assert acc <= min(o.robust_acc for o in outcomes)
    attack_ids = ids[1:]
    acc2, _ = store.sample_matrix(attack_ids).worst_case()
    by_hand2 = [all(dict((i, c) for i, c, _ in rows[e]["samples"])[i] for e in attack_ids) for i in range(N_TEST)]
    assert acc2 == pytest.approx(sum(by_hand2) / N_TEST) and acc2 >= acc
    assert store.sample_matrix(ids[:1]).worst_case() == (pytest.approx(outcomes[0].robust_acc), N_TEST)
    assert store.sample_matrix(ids + ids).worst_case() == (acc, n)  # a repeated id is the same evaluation


def test_worst_case_over_different_sample_sets_uses_the_common_samples(store, checkpoint, data):
    full = evaluate_checkpoint(store, checkpoint, data, SPECS[:1], log=quiet).outcomes
    part = evaluate_checkpoint(store, checkpoint, data, SPECS[1:], n_samples=20, log=quiet).outcomes
    ids = [full[1].evaluation_id, part[1].evaluation_id]
    rows = stored(store)
    common = eval_indices(N_TEST, 20)
    fgsm = {i: c for i, c, _ in rows[ids[0]]["samples"]}
    pgd = {i: c for i, c, _ in rows[ids[1]]["samples"]}
    assert store.sample_matrix(ids).worst_case() == (pytest.approx(sum(fgsm[i] and pgd[i] for i in common) / 20), 20)
    assert store.sample_matrix([]).worst_case()[1] == 0


# --------------------------------------------------------------------------- attacks that leave their threat model

@dataclass(frozen=True)
class LinfConfig:
    norm: str = "Linf"
    eps: float = EPS


class OutsideBall(Attack):
    """Moves every pixel by 2·eps towards the middle of [0, 1]: inside [0, 1], outside the ball."""
    Config = LinfConfig

    def perturb(self, model, x, y):
        step = 2 * self.config.eps
        return torch.where(x < 0.5, x + step, x - step)


class OutsideBox(Attack):
    """Stays in the eps ball but leaves [0, 1]."""
    Config = LinfConfig

    def perturb(self, model, x, y):
        return x - self.config.eps / 2


@pytest.mark.parametrize("cls", [OutsideBall, OutsideBox])
def test_an_attack_outside_its_threat_model_is_an_error(store, checkpoint, data, registered, cls):
    name = f"test_{cls.__name__.lower()}"
    registered(ATTACKS, name, cls)
    assert (data.test_x < EPS / 2).any()  # so OutsideBox really leaves [0, 1]
    with pytest.raises(BenchError, match=rf"attack '{name}' returned points outside \[0, 1\] or its Linf eps=0.1 ball"):
        evaluate_checkpoint(store, checkpoint, data, [AttackSpec("bad", name, {})], log=quiet)
    assert [r["attack"] for r in stored(store).values()] == ["clean"]  # nothing stored for the bad attack


# --------------------------------------------------------------------------- model mode and determinism

class RecordsMode(Attack):
    Config = LinfConfig
    modes: list = []

    def perturb(self, model, x, y):
        type(self).modes.append(model.training)
        if len(type(self).modes) == 2:
            raise RuntimeError("attack crashed")
        return x


def test_run_attack_uses_eval_mode_and_restores_the_mode(checkpoint, data, registered):
    registered(ATTACKS, "test_records_mode", RecordsMode)
    RecordsMode.modes = []
    model, _ = load_model(checkpoint)
    model.train()
    result = run_attack(model, None, data.test_x, data.test_y, 16)
    correct, norms, fwd, bwd = result.correct, result.norms, result.forward, result.backward
    assert model.training and correct.shape == (N_TEST,) and norms is None and (fwd, bwd) == (N_TEST, 0)
    attack = RecordsMode()
    with pytest.raises(RuntimeError, match="attack crashed"):
        run_attack(model, attack, data.test_x, data.test_y, 16)
    assert RecordsMode.modes == [False, False]
    assert model.training  # restored after a crash too
    model.eval()
    run_attack(model, None, data.test_x, data.test_y, 16)
    assert not model.training


def test_evaluation_is_deterministic_whatever_the_global_rng(tmp_path, monkeypatch, checkpoint, data):
    monkeypatch.chdir(tmp_path)
    # L2 with a random start: the perturbation norms record the random radius, sample by sample
    specs = [AttackSpec("pgd_rs", "pgd", {"norm": "L2", "eps": 0.5, "steps": 1, "step_size": 0.01,
                                          "random_start": True})]
    results = []
    for name, caller_seed in (("a.db", 1234), ("b.db", 99)):
        torch.manual_seed(caller_seed)  # the evaluation's own seed decides, not the caller's RNG state
        store = Store(str(tmp_path / name))
        evaluate_checkpoint(store, checkpoint, data, specs, seed=5, log=quiet)
        results.append([(r["label"], r["robust_acc"], r["samples"]) for r in stored(store).values()])
    assert results[0] == results[1]
    norms = [n for _, _, n in results[0][1][2]]
    assert len(set(norms)) > N_TEST // 2  # random starts really were used (not a trivial equality)
    # the seed is part of an evaluation's identity, and changes the random starts
    store = Store(str(tmp_path / "a.db"))
    other = evaluate_checkpoint(store, checkpoint, data, specs, seed=6, log=quiet).outcomes
    assert not any(o.cached for o in other) and count(store, Evaluation) == 4
    assert [n for _, _, n in stored(store)[other[1].evaluation_id]["samples"]] != norms

# --------------------------------------------------------------------------- wrong inputs

def test_a_checkpoint_for_another_dataset_is_an_error(store, checkpoint):
    digits = load_dataset("digits")
    with pytest.raises(BenchError, match="was trained on 'synthetic', not 'digits'"):
        evaluate_checkpoint(store, checkpoint, digits, SPECS, log=quiet)
    assert count(store, Evaluation) == 0


def test_a_checkpoint_for_other_dataset_options_is_an_error(store, checkpoint):
    """Same dataset name, other generated data (seed 1): the checkpoint's dataset_options say
    which data it belongs to; evaluating it on other samples (and caching that under the same
    identity) would be silently wrong."""
    other = load_dataset("synthetic", **{**OPTIONS, "seed": 1})
    assert not torch.equal(other.test_x, load_dataset("synthetic", **OPTIONS).test_x)
    with pytest.raises(BenchError, match="synthetic"):
        evaluate_checkpoint(store, checkpoint, other, SPECS, log=quiet)
    assert count(store, Evaluation) == 0


def test_bad_specs_are_rejected_before_any_work(store, checkpoint, data, tmp_path):
    with pytest.raises(BenchError, match="unknown attack 'pgdd'. Did you mean 'pgd'"):
        evaluate_checkpoint(store, checkpoint, data, SPECS + [AttackSpec("x", "pgdd", {})], log=quiet)
    with pytest.raises(BenchError, match="unknown parameter 'step' for attack 'pgd'. Did you mean 'steps'"):
        evaluate_checkpoint(store, checkpoint, data, [AttackSpec("x", "pgd", {"step": 3})], log=quiet)
    with pytest.raises(BenchError, match="does not exist"):
        evaluate_checkpoint(store, tmp_path / "missing.pt", data, SPECS, log=quiet)
    assert count(store, Evaluation) == 0


# --------------------------------------------------------------------------- failures keep what is stored

class FailsMidway(Attack):
    """Identity attack that raises on its second batch while `fail` is set."""
    Config = LinfConfig
    fail = False
    batches = 0

    def perturb(self, model, x, y):
        type(self).batches += 1
        if type(self).fail and type(self).batches == 2:
            raise RuntimeError("attack failed mid-way")
        return x


def test_an_attack_failing_midway_keeps_earlier_evaluations(store, checkpoint, data, registered):
    registered(ATTACKS, "test_fails_midway", FailsMidway)
    specs = SPECS + [AttackSpec("flaky", "test_fails_midway", {})]

    FailsMidway.fail, FailsMidway.batches = True, 0
    with pytest.raises(RuntimeError, match="mid-way"):
        evaluate_checkpoint(store, checkpoint, data, specs, batch_size=16, log=quiet)
    rows = stored(store)
    assert sorted(r["label"] for r in rows.values()) == ["clean", "fgsm", "pgd5"]
    assert all([i for i, _, _ in r["samples"]] == list(range(N_TEST)) for r in rows.values())

    FailsMidway.fail, FailsMidway.batches = False, 0
    done = evaluate_checkpoint(store, checkpoint, data, specs, batch_size=16, log=quiet).outcomes
    assert [o.cached for o in done] == [True, True, True, False]
    good = stored(store)
    assert len(good) == 4

    FailsMidway.fail, FailsMidway.batches = True, 0
    with pytest.raises(RuntimeError, match="mid-way"):
        evaluate_checkpoint(store, checkpoint, data, specs, batch_size=16, force=True, log=quiet)
    after = stored(store)
    flaky = [e for e, r in good.items() if r["label"] == "flaky"][0]
    assert after[flaky] == good[flaky]  # the stored evaluation of the failing attack is intact
    assert sorted(r["label"] for r in after.values()) == ["clean", "fgsm", "flaky", "pgd5"]
    for r in after.values():  # the others were redone under force, each complete
        assert [i for i, _, _ in r["samples"]] == list(range(N_TEST))
    assert count(store, SampleResult) == 4 * N_TEST


# --------------------------------------------------------------------------- randomized models' verdicts

class _Coin(torch.nn.Module):
    """Predicts class 0 with probability 0.7 on each pass, per sample."""

    def forward(self, x):
        coin = torch.rand(len(x)) < 0.7
        return torch.stack([coin.float(), (~coin).float()], 1)


def test_a_randomized_model_is_judged_by_the_plurality_of_its_draws():
    """Single draws ANDed over five evaluations keep 0.7^5 ≈ 17% of the samples; the plurality of
    9 draws (class 0 with probability P(Bin(9, 0.7) ≥ 5) ≈ 0.90) keeps about 0.9^5 ≈ 59%."""
    torch.manual_seed(0)
    model, x, y = _Coin(), torch.zeros(2000, 1), torch.zeros(2000, dtype=torch.long)
    single = torch.stack([evaluation.verdict(model, x)[1] == y for _ in range(5)]).all(0).float().mean()
    plural = torch.stack([evaluation.verdict(model, x, 9)[1] == y for _ in range(5)]).all(0).float().mean()
    assert single < 0.22 and 0.52 < plural < 0.66, (single, plural)
    deterministic = torch.nn.Linear(1, 2)
    assert torch.equal(evaluation.verdict(deterministic, x, 1)[0], deterministic(x))


def test_verdict_draws_tell_randomized_models_and_enter_their_identity(synthetic, trained_model, tmp_path):
    from bench.core.planted import BatchRandom, NoisyInput

    device = torch.device("cpu")
    assert evaluation.verdict_draws(trained_model, synthetic, device) == 1
    assert evaluation.verdict_draws(NoisyInput(trained_model), synthetic, device) == evaluation.VERDICT_DRAWS
    assert evaluation.verdict_draws(BatchRandom(trained_model), synthetic, device) == evaluation.VERDICT_DRAWS
    hash_of = evaluation.Evaluator.config_hash
    assert hash_of("pgd", {"eps": 0.1}, "atbench r2") == hash_of("pgd", {"eps": 0.1}, "atbench r2", 1)
    assert hash_of("pgd", {"eps": 0.1}, "atbench r2") != hash_of("pgd", {"eps": 0.1}, "atbench r2", 9)
