"""Models from outside (`bench.engine.external`): the factory by name, weights read without running
code in the layouts training scripts and RobustBench write, key prefixes, mismatches, the declared
normalization; and `bench eval --model`'s bad input: exit status 2, one line, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from external_models import DigitsNet, WideResNet, digits_net

from bench.app.cli import main
from bench.core.errors import BenchError
from bench.engine.external import build_factory, load_weights, match_keys, normalized, parse_normalize


class Payload:
    """Unpickling this calls open(marker, "w"): a weights file that runs code when loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model_state_dict", "model", "module.", "model."])
def test_weights_in_every_layout_load(layout, tmp_path):
    torch.manual_seed(1)
    source = digits_net()
    state = source.state_dict()
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3, "opt": {"lr": 0.1}},
           "model_state_dict": {"model_state_dict": state}, "model": {"model": state},
           "module.": {f"module.{k}": v for k, v in state.items()},
           "model.": {"state_dict": {f"model.{k}": v for k, v in state.items()}}}[layout]
    torch.save(obj, tmp_path / "w.pt")
    torch.manual_seed(2)
    target = load_weights(digits_net(), tmp_path / "w.pt")
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(outputs(target, x), outputs(source, x))


def test_a_robustbench_style_checkpoint_loads_into_its_architecture(tmp_path):
    """A WideResNet with RobustBench's parameter names, random weights (BatchNorm statistics too),
    saved as the zoo's files are ({"state_dict": {"module." + name: tensor}}): it loads, and the
    loaded model computes what the saved one does."""
    torch.manual_seed(0)
    source = WideResNet(depth=10, widen_factor=1, in_channels=1)
    for m in source.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    assert {"block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "fc.bias"} <= set(source.state_dict())
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "Standard.pt")
    target = load_weights(WideResNet(depth=10, widen_factor=1, in_channels=1), tmp_path / "Standard.pt")
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(outputs(target, x), outputs(source, x), rtol=0, atol=0)


def test_a_prefix_is_kept_when_the_model_has_it():
    state = {"model.weight": torch.zeros(1)}
    assert match_keys(state, ["model.weight"]) == state
    assert set(match_keys({"module.model.weight": torch.zeros(1)}, ["model.weight"])) == {"model.weight"}


@pytest.mark.parametrize("make, message", [
    (lambda d: {"other": torch.zeros(3)}, r"do not fit the model: missing features.0.weight, features.0.bias, "
                                           r"features.2.weight and 3 more, unexpected other"),
    (lambda d: {**d, "head.weight": torch.zeros(3, 3)}, r"do not fit the model: size mismatch for head.weight"),
    (lambda d: {"epoch": 3, "lr": 0.1}, r"holds no state dict: expected a dict of tensors.*\(its keys: epoch, lr\)"),
    (lambda d: [1, 2, 3], r"holds no state dict"),
])
def test_weights_that_do_not_fit_are_one_line(make, message, tmp_path):
    torch.save(make(digits_net().state_dict()), tmp_path / "w.pt")
    with pytest.raises(BenchError, match=message) as info:
        load_weights(digits_net(), tmp_path / "w.pt")
    assert "\n" not in str(info.value)


def test_weights_that_would_run_code_are_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": digits_net().state_dict(), "hook": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BenchError, match="refusing to load .*weights_only=True"):
        load_weights(digits_net(), tmp_path / "evil.pt")
    assert not marker.exists()


def test_factory_by_name():
    model = build_factory("external_models:digits_net", {"width": 4})
    assert isinstance(model, DigitsNet) and model.head.in_features == 4 * 2 * 16
    assert isinstance(build_factory("external_models:DigitsNet"), DigitsNet)  # a class is a factory too


@pytest.mark.parametrize("spec, kwargs, message", [
    ("external_models.digits_net", {}, "must name a factory as pkg.module:function"),
    ("no_such_module:f", {}, "cannot import 'no_such_module'"),
    ("external_models:nope", {}, "'external_models' has no 'nope'"),
    ("external_models:torch", {}, "is not callable"),
    ("external_models:digits_net", {"depth": 3}, "does not accept the arguments {'depth': 3}"),
    ("external_models:torch.zeros", {"size": [2]}, "returned a Tensor, not a torch.nn.Module"),
])
def test_factory_errors(spec, kwargs, message):
    with pytest.raises(BenchError, match=message):
        build_factory(spec, kwargs)


def test_normalization():
    assert parse_normalize("0.5,0.25", 3) == ([0.5] * 3, [0.25] * 3)
    assert parse_normalize("0.1,0.2,0.3,1,2,3", 3) == ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    for text in ("0.5", "0.1,0.2,0.3", "a,b"):
        with pytest.raises(BenchError, match="--normalize takes MEAN,STD"):
            parse_normalize(text, 3)
    torch.manual_seed(0)
    inner = digits_net()
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(outputs(normalized(inner, [0.3], [0.4]), x), outputs(inner, (x - 0.3) / 0.4))


# --------------------------------------------------------------------------- bench eval --model: bad input

def _weights(tmp_path: Path) -> str:
    torch.save(digits_net().state_dict(), tmp_path / "w.pt")
    return str(tmp_path / "w.pt")


BAD = {
    "no model": (lambda t: ["eval"], "bench eval takes one model: a CHECKPOINT file, --model"),
    "two models": (lambda t: ["eval", "x.pt", "--model", "external_models:digits_net"], "got CHECKPOINT and --model"),
    "no dataset": (lambda t: ["eval", "--model", "external_models:digits_net"], "--model needs --dataset"),
    "weights alone": (lambda t: ["eval", "x.pt", "--weights", "w.pt"], "--weights go.es. with --model"),
    "dataset of a checkpoint": (lambda t: ["eval", "x.pt", "--dataset", "digits"], "a checkpoint file records its dataset"),
    "other norm without eps": (lambda t: ["eval", "--model", "external_models:digits_net", "--dataset", "digits",
                                          "--norm", "L2"], "--norm L2 needs --eps"),
    "weights missing": (lambda t: ["eval", "--model", "external_models:digits_net", "--dataset", "digits",
                                   "--weights", str(t / "none.pt")], "weights file .* does not exist"),
    "weights of another model": (lambda t: ["eval", "--model", "external_models:digits_net", "--model-arg", "width=4",
                                            "--dataset", "digits", "--weights", _weights(t)], "do not fit the model"),
    "bad normalize": (lambda t: ["eval", "--model", "external_models:digits_net", "--dataset", "digits",
                                 "--normalize", "0.5"], "--normalize takes MEAN,STD"),
    "bad factory": (lambda t: ["eval", "--model", "external_models", "--dataset", "digits"], "pkg.module:function"),
    "attack of another norm": (lambda t: ["eval", "--model", "external_models:digits_net", "--dataset", "digits",
                                          "--attack", "pgd:norm=\"L2\""], "uses L2 but the model is evaluated at"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bench_eval_model_bad_input(case, tmp_path, monkeypatch, capsys):
    make, message = BAD[case]
    monkeypatch.chdir(tmp_path)
    argv = make(tmp_path) + ["--db", str(tmp_path / "r.db")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no database, nothing written
