"""Evaluating a model defined outside atbench: the Python API (`atbench.evaluate`, its docstring
example), `bench eval --model`, the model's identity in the store, and its entry in the report."""

from __future__ import annotations

import doctest
import sqlite3

import pytest
import torch
from external_models import digits_net, train_digits_net

import atbench
from bench.app import api
from bench.app.cli import main
from bench.app.report import render_report
from bench.core.data import load_dataset
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.pretrained import Pretrained
from bench.engine.subject import Subject, identity
from bench.engine.trainer import train
from bench.store import Store

ATTACKS = ["fgsm", "pgd10=pgd:steps=10"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """(DigitsNet trained on normalized digits, mean, std): ~90% clean accuracy."""
    return train_digits_net(digits)


def test_the_docstring_example_runs():
    result = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_evaluate_any_module(tmp_path, trained, digits):
    """The whole stage on a model that is no registered architecture: per-attack accuracies, the
    worst case as the per-sample AND of the stored rows, the checks, the evaluation ids; a second
    call finds everything stored."""
    model, mean, std = trained
    db = str(tmp_path / "results.db")
    kwargs = dict(dataset="digits", threat="Linf:0.1", attacks=ATTACKS, name="digits_net", normalize=(mean, std),
                  n_samples=60, db=db, curves=False)
    result = atbench.evaluate(model, **kwargs)
    assert isinstance(result, atbench.EvaluationResult)
    assert (result.name, result.dataset, result.threat, result.n_samples) == ("digits_net", "digits",
                                                                              ThreatModel("Linf", 0.1), 60)
    assert list(result.accuracy) == ["fgsm", "pgd10"] and list(result.evaluation_ids) == ["clean", "fgsm", "pgd10"]
    assert result.clean >= 0.8 and result.accuracy["pgd10"] < result.clean  # trained, and attacked for real
    with sqlite3.connect(db) as con:
        per_sample = dict(con.execute("select sample_index, min(correct) from sample_results group by sample_index"))
        (path, config), = con.execute("select path, config from checkpoints")
    assert result.worst_case == pytest.approx(sum(per_sample.values()) / 60)
    assert path == "python:digits_net" and '"name": "digits_net"' in config and '"source": "python"' in config
    assert result.checks["deterministic_outputs"].status == "pass"
    assert {c.status for c in result.checks.values()} <= {"pass", "warn", "fail", "not-run"}
    assert "worst case" in repr(result) and "digits_net on digits, Linf eps=0.1, 60 samples" in repr(result)

    again = atbench.evaluate(model, **kwargs)
    assert again.evaluation_ids == result.evaluation_ids and again.worst_case == result.worst_case


def test_bench_eval_model_is_the_same_model_as_the_api(tmp_path, monkeypatch, capsys, trained, digits):
    """`bench eval --model external_models:digits_net --weights FILE --normalize MEAN,STD` builds the
    model the API was given (weights saved in a training script's layout: under "state_dict", keys
    prefixed "module."), so under the same name it is the same checkpoint of the store and its
    evaluations are found stored; the report lists it as an external entry with its name."""
    model, mean, std = trained
    monkeypatch.chdir(tmp_path)
    atbench.evaluate(model, dataset="digits", threat="Linf:0.1", attacks=ATTACKS, name="my-digits-net",
                     normalize=(mean, std), n_samples=60, db="results.db", curves=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 7}, "w.pt")
    argv = ["eval", "--model", "external_models:digits_net", "--weights", "w.pt", "--normalize", f"{mean[0]},{std[0]}",
            "--name", "my-digits-net", "--dataset", "digits", "--eps", "0.1", "--n-samples", "60", "--no-curves",
            "--device", "cpu"] + [a for attack in ATTACKS for a in ("--attack", attack)]
    with sqlite3.connect("results.db") as con:
        before = con.execute("select count(*) from evaluations").fetchone()[0]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("evaluating my-digits-net (digits, Linf eps=0.1; sha256 ")
    assert "worst case" in out
    with sqlite3.connect("results.db") as con:
        assert con.execute("select count(*) from checkpoints").fetchone()[0] == 1
        assert con.execute("select count(*) from evaluations").fetchone()[0] == before
        (path,) = con.execute("select path from checkpoints").fetchone()
    assert path == "w.pt"  # where it was seen last

    index = render_report(Store("results.db"), tmp_path / "reports").read_text()
    assert "my-digits-net" in index and "external" in index


def test_evaluate_runs_the_remedy_of_a_failed_check(tmp_path, trained):
    """A model answering with probabilities fails logits_not_probabilities; the adaptive stage runs
    logit recovery (at the given budget) and the result carries the adaptive worst case and what the
    remedy did, which is at most the worst case; adaptive=False (another store) runs no remedy."""
    model, mean, std = trained
    softmax = torch.nn.Sequential(model, torch.nn.Softmax(1))
    args = dict(dataset="digits", threat="Linf:0.1", attacks=["pgd10=pgd:steps=10"], n_samples=40, curves=False,
                normalize=(mean, std), remedies={"logit_recovery": {"steps": 10, "n_target_classes": 3}})
    result = atbench.evaluate(softmax, db=str(tmp_path / "a.db"), **args)
    assert result.checks["logits_not_probabilities"].status == "fail"
    assert result.remedies["logits_not_probabilities"].startswith("logit recovery → ")
    assert set(result.adaptive_ids) == {"logit_recovery:apgd_ce", "logit_recovery:apgd_t"}
    assert result.adaptive_worst_case <= result.worst_case and result.adaptive_n == result.n_samples == 40
    assert "adaptive" in repr(result) and "logits_not_probabilities: logit recovery → " in repr(result)
    off = atbench.evaluate(softmax, db=str(tmp_path / "b.db"), adaptive=False, **args)
    assert (off.adaptive_worst_case, off.adaptive_ids, off.remedies) == (None, {}, {})
    assert off.worst_case == result.worst_case


def test_identity_is_the_weights_and_the_name(trained):
    model, _, _ = trained
    other = digits_net()
    assert identity(model, "a") == identity(model, "a") != identity(model, "b")
    assert identity(other, "a") != identity(model, "a")
    copy = digits_net()
    copy.load_state_dict(model.state_dict())
    assert identity(copy, "a") == identity(model, "a")


def test_attacks_from_a_suite_at_the_given_threat():
    """A suite's name gives its [attacks], their eps that of the threat asked for."""
    specs = api.attack_specs("demo", ThreatModel("Linf", 0.05))
    assert [s.label for s in specs] == ["fgsm", "pgd20", "pgd100", "cw_linf", "mim", "aa_cpu", "transfer", "noise"]
    assert {s.params["eps"] for s in specs} == {0.05}
    assert specs[5].params["square_queries"] == 500
    with pytest.raises(BenchError, match="no suite 'nosuch'.*demo"):
        api.attack_specs("nosuch", ThreatModel("Linf", 0.05))


def test_attack_of_another_norm_needs_its_eps():
    linf = ThreatModel("Linf", 0.1)
    assert api.attack_specs(["pgd:norm=\"L2\",eps=0.5"], linf)[0].params == {"norm": "L2", "eps": 0.5}
    with pytest.raises(BenchError, match="uses L2 but the model is evaluated at Linf eps=0.1: give its eps"):
        api.attack_specs(["pgd:norm=\"L2\""], linf)


@pytest.mark.parametrize("kwargs, message", [
    (dict(threat="Linf"), "threat must be NORM:EPS"),
    (dict(threat="Linf:2"), "out of range for Linf"),
    (dict(normalize=(0.5,)), r"normalize must be \(mean, std\)"),
    (dict(normalize=([0.5, 0.5], 0.2)), "one number or 1 .one per channel."),
    (dict(normalize=(0.5, 0.0)), "std must be > 0"),
    (dict(attacks=["pgdd"]), "unknown attack 'pgdd'"),
    (dict(dataset="digitz"), "unknown dataset 'digitz'"),
    (dict(remedies={"eto": {}}), "unknown remedy 'eto'.*Did you mean 'eot'"),
    (dict(remedies={"eot": {"max_k": 0}}), "max_k must be >= 1"),
])
def test_bad_input_is_one_line(kwargs, message, tmp_path):
    args = dict(dataset="digits", db=str(tmp_path / "r.db"), curves=False, n_samples=4)
    with pytest.raises(BenchError, match=message) as info:
        atbench.evaluate(digits_net(), **{**args, **kwargs})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r.db").exists()


def test_not_a_module_is_refused(digits):
    with pytest.raises(BenchError, match="must be a torch.nn.Module, got function"):
        Subject.external(digits_net, "x", digits, digits.default_threat)


def test_runs_on_demand_need_an_architecture_for_an_external_model(tmp_path, digits):
    """A transfer surrogate names its own architecture; a run that would default to the evaluated
    model's architecture cannot, when that model was defined elsewhere."""
    pretrained = Pretrained(digits, Store(str(tmp_path / "r.db")), tmp_path, torch.device("cpu"),
                            digits.default_threat, "", {}, None, trainer=train)
    assert pretrained.spec("natural", model="mlp", train={"epochs": 1}).model == "mlp"
    with pytest.raises(BenchError, match="defined outside atbench: name a registered architecture"):
        pretrained.spec("natural", train={"epochs": 1})


@pytest.mark.parametrize("cuda_build, why", [
    (None, "this torch .* is a CPU-only build"),
    ("12.4", r"torch .* \(CUDA 12.4\) sees no usable GPU \(driver too old, or none visible\)")])
def test_cuda_asked_for_but_unusable_says_why_and_how_to_use_the_cpu(monkeypatch, cuda_build, why):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(BenchError, match=f"--device cuda was asked for, but CUDA is not available: {why}; to run "
                                         r"on the CPU anyway \(far slower\), use --device cpu \(make bench DEVICE=cpu\)"):
        api.pick_device("cuda")
    assert api.pick_device(None) == torch.device("cpu")
