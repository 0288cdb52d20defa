"""RobustBench: loading a zoo model (the parts that need neither the `robustbench` package, which
needs torchvision, nor the network: the package's absence, the weights' place and a failed
download; the weights themselves are tested in test_external.py on a RobustBench-style
WideResNet), and `bench export --robustbench`: RobustBench's model_info JSON, read back."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch.nn as nn
from external_models import train_digits_net

import atbench
from bench.app.cli import main
from bench.app.robustbench import FIELDS, fetch, weights_path, zoo_model
from bench.core.data import load_dataset
from bench.core.errors import BenchError
from bench.core.threat import parse_eps
from bench.store import Store

AA = "aa=autoattack"  # the standard version at its own budget: RobustBench's autoattack_acc
AA_CPU = "aa=autoattack:apgd_steps=5,fab_steps=5,square_queries=50,n_target_classes=3"  # a reduced one: not


@pytest.fixture
def no_robustbench(monkeypatch):
    """The package absent, as it is here (sys.modules None: the import fails)."""
    for name in ("robustbench", "robustbench.model_zoo", "robustbench.model_zoo.enums", "robustbench.utils"):
        monkeypatch.setitem(sys.modules, name, None)


def test_without_the_package_the_error_says_what_to_install(no_robustbench, tmp_path):
    with pytest.raises(BenchError, match=r"needs the robustbench package: pip install 'atbench\[robustbench\]'"):
        zoo_model("Standard", "cifar10", "Linf", tmp_path)


def test_bench_eval_robustbench_without_the_package(no_robustbench, tmp_path, monkeypatch, capsys):
    """One line, before any dataset is read (CIFAR-10 is not here either), nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--robustbench", "Standard", "--dataset", "cifar10", "--norm", "Linf"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: --robustbench needs the robustbench package: pip install 'atbench[robustbench]'")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_weights_live_where_robustbench_keeps_them(tmp_path):
    assert weights_path(tmp_path, "cifar10", "L2", "Standard") == tmp_path / "cifar10" / "L2" / "Standard.pt"


def test_an_offline_download_says_where_to_put_the_file(tmp_path):
    path = weights_path(tmp_path, "cifar10", "Linf", "Standard")

    def offline():
        path.write_bytes(b"partial")  # what an interrupted download leaves
        raise ConnectionError("Failed to resolve 'drive.google.com' ([Errno -3] Temporary failure in name resolution)")

    with pytest.raises(BenchError, match=r"cannot download the weights to .*Standard.pt' \(ConnectionError: Failed to "
                                         r"resolve.*\); offline, copy the file there") as info:
        fetch(path, offline)
    assert "\n" not in str(info.value) and not path.exists()
    with pytest.raises(BenchError, match="the download left no file"):
        fetch(path, lambda: None)


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def store_with_rows(tmp_path_factory):
    """A store with four leaderboard rows: a checkpoint trained here (synthetic, `bench train` +
    `bench eval` with AutoAttack at a reduced budget), an atbench checkpoint whose run is in another
    store (another seed, the same attacks), a model from outside (digits, AutoAttack at its budget)
    and the same model answering with probabilities (its logits_not_probabilities check fails)."""
    root = tmp_path_factory.mktemp("export")
    db = str(root / "results.db")
    for seed, store in (("0", db), ("1", str(root / "elsewhere.db"))):
        assert main(["train", "--defense", "natural", "--dataset", "synthetic", "--epochs", "1", "--device", "cpu",
                     "--seed", seed, "--db", store, "--checkpoints", str(root / f"ck{seed}")]) == 0
        (run,) = (root / f"ck{seed}").iterdir()
        assert main(["eval", str(run / "best.pt"), "--attack", "fgsm", "--attack", AA_CPU, "--n-samples", "16",
                     "--no-curves", "--db", db, "--device", "cpu", "--checkpoints", str(root / "ck")]) == 0
    model, mean, std = train_digits_net(load_dataset("digits"))
    common = dict(dataset="digits", threat="Linf:0.1", n_samples=40, db=db, curves=False, normalize=(mean, std))
    atbench.evaluate(model, name="digits-net <x>", attacks=["fgsm", AA], **common)
    atbench.evaluate(nn.Sequential(model, nn.Softmax(1)), name="softmax-net", attacks=["fgsm"], **common)
    return db, root


def strict(constant):
    raise AssertionError(f"{constant} is not JSON")


def read_accuracy(text) -> float:
    """As RobustBench reads them (utils.list_available_models): float(text) / 100."""
    return float(text) / 100


def test_export_writes_robustbench_model_info(store_with_rows, tmp_path, capsys):
    db, _ = store_with_rows
    assert main(["export", "--robustbench", str(tmp_path / "info"), "--db", db]) == 0
    assert "wrote 4 RobustBench model_info file(s)" in capsys.readouterr().out
    paths = sorted((tmp_path / "info").rglob("*.json"))
    assert [p.relative_to(tmp_path / "info").parent.as_posix() for p in paths] == ["digits/Linf", "digits/Linf",
                                                                                   "synthetic/Linf", "synthetic/Linf"]
    for path in paths:
        info = json.loads(path.read_text(), parse_constant=strict)
        assert tuple(info) == FIELDS
        assert all(info[k] is None for k in ("link", "authors", "venue", "reported"))
        assert info["number_forward_passes"] == 1 and isinstance(info["unreliable"], bool)
        assert info["dataset"] == path.parent.parent.name and parse_eps(info["eps"]) == 0.1
        for key in ("clean_acc", "external", "autoattack_acc"):  # RobustBench's text: percent, two decimals
            assert info[key] is None or (isinstance(info[key], str) and len(info[key].partition(".")[2]) <= 2)


def rows_by_name(db, out) -> dict[str, dict]:
    assert main(["export", "--robustbench", str(out), "--db", db]) == 0
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in out.rglob("*.json")}


def test_exported_numbers_are_the_stored_ones(store_with_rows, tmp_path):
    """Read back as RobustBench reads them, each number is the store's to the 0.005 points the
    two-decimal percent text keeps: clean, AutoAttack (standard), and `external` the per-sample
    AND over clean and every attack of the row (the adaptive attacks the softmax model's failed
    check called for are in its footnote, not in `external`)."""
    db, _ = store_with_rows
    infos = rows_by_name(db, tmp_path / "info")
    assert infos["natural"]["name"] == "natural" and infos["best.pt"]["footnote"].startswith("Measured by atbench on 16")
    assert set(infos) == {"natural", "best.pt", "digits-net <x>", "softmax-net"}
    store = Store(db)
    ev = store.tables()["evaluations"]
    for name, info in infos.items():
        ck = store.tables()["checkpoints"]
        if name in ("natural", "best.pt"):  # the checkpoint whose run is in this store, and the other
            checkpoint_id = int(ck[ck["run_id"].notna() == (name == "natural")]["checkpoint_id"].iloc[0])
        else:
            checkpoint_id = int(ck[ck["config"].map(lambda c: c.get("name")) == name]["checkpoint_id"].iloc[0])
        mine = ev[(ev["checkpoint_id"] == checkpoint_id) & (ev["role"] == "attack")]
        by_label = {r.label: r for r in mine.itertuples()}
        assert read_accuracy(info["clean_acc"]) == pytest.approx(by_label["clean"].robust_acc, abs=5e-5)
        matrix = store.sample_matrix(mine["evaluation_id"].tolist())
        assert read_accuracy(info["external"]) == pytest.approx(matrix.worst_case()[0], abs=5e-5)
        if name == "digits-net <x>":  # AutoAttack at its budget
            assert read_accuracy(info["autoattack_acc"]) == pytest.approx(by_label["aa"].robust_acc, abs=5e-5)
            assert "AutoAttack: atbench r" in info["footnote"]
            assert 0 < by_label["aa"].robust_acc < by_label["clean"].robust_acc  # a number worth comparing
        else:  # at a reduced budget (the synthetic runs) or not at all
            assert info["autoattack_acc"] is None and "AutoAttack:" not in info["footnote"]
        assert info["architecture"] == {"natural": "small_cnn", "best.pt": "small_cnn",
                                        "digits-net <x>": "external_models.DigitsNet",
                                        "softmax-net": "torch.nn.modules.container.Sequential"}[name]
        assert info["additional_data"] is (False if name == "natural" else None)
    assert infos["softmax-net"]["unreliable"] is True
    assert "failed sanity checks: logits_not_probabilities" in infos["softmax-net"]["footnote"]
    assert re.search(r"adaptive worst case \(with the remedies of the flagged checks\) \d+(\.\d+)?%",
                     infos["softmax-net"]["footnote"])
    assert "adaptive" not in infos["digits-net <x>"]["footnote"]
    assert infos["natural"]["unreliable"] is False and infos["digits-net <x>"]["unreliable"] is False
