"""The generic Registry, the real registries' contents, build_config, threat models, and the
registered models (shapes, normalization inside the model, eval_mode)."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import pytest
import torch

from bench.core.attack import ATTACKS
from bench.core.config import build_config, parse_number
from bench.core.data import DATASETS
from bench.core.defense import DEFENSES
from bench.core.errors import BenchError
from bench.core.models import MODELS, Normalize, build_model, build_model_from_spec, eval_mode
from bench.core.registry import Registry
from bench.core.threat import ThreatModel, check_eps, check_norm, format_eps, parse_eps

# --------------------------------------------------------------------------- Registry


class Base:
    pass


@pytest.fixture
def registry() -> Registry:
    reg: Registry = Registry("widget", base=Base)

    @reg.register("alpha")
    class Alpha(Base):
        pass

    @reg.register("beta_gamma")
    class BetaGamma(Base):
        pass

    return reg


def test_register_and_get(registry):
    cls = registry.get("alpha")
    assert issubclass(cls, Base) and cls.__name__ == "Alpha"
    assert cls.name == "alpha"  # the registry key is recorded on the class
    assert registry.names() == ["alpha", "beta_gamma"]
    assert list(registry) == ["alpha", "beta_gamma"] and len(registry) == 2
    assert "alpha" in registry and "gamma" not in registry


def test_duplicate_name_is_refused(registry):
    first = registry.get("alpha")

    with pytest.raises(ValueError, match="duplicate widget name 'alpha'"):
        @registry.register("alpha")
        class Other(Base):
            pass

    assert registry.get("alpha") is first  # the original registration is untouched
    assert len(registry) == 2


def test_class_outside_the_base_is_refused(registry):
    with pytest.raises(TypeError, match="subclass of Base"):
        @registry.register("stranger")
        class Stranger:  # not a Base
            pass

    with pytest.raises(TypeError, match="subclass of Base"):
        registry.register("function")(lambda: None)
    assert "stranger" not in registry and "function" not in registry


def test_registry_without_base_takes_callables_by_their_name():
    reg: Registry = Registry("thing")

    @reg.register()
    def my_factory():
        return 1

    assert reg.get("my_factory") is my_factory
    with pytest.raises(TypeError, match="callable"):
        reg.register("number")(42)
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("my_factory")(lambda: 2)


def test_unknown_name_lists_known_names_and_suggests_the_closest(registry):
    with pytest.raises(BenchError) as info:
        registry.get("alpah")
    message = str(info.value)
    assert "unknown widget 'alpah'" in message
    assert "Did you mean 'alpha'?" in message
    assert "alpha" in message and "beta_gamma" in message


def test_unknown_name_without_a_close_match_has_no_suggestion(registry):
    with pytest.raises(BenchError) as info:
        registry.get("zzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "alpha, beta_gamma" in str(info.value)


def test_unknown_name_is_not_a_keyerror(registry):
    # BenchError is what the CLI prints on one line; a bare KeyError would be a traceback
    with pytest.raises(BenchError):
        registry.get("")
    assert not issubclass(BenchError, KeyError)


EXPECTED = {
    "defense": ({"natural", "fgsm_at", "fast_at", "pgd_at", "trades", "mart"}, lambda: DEFENSES),
    "attack": ({"fgsm", "pgd", "mim"}, lambda: ATTACKS),
    "model": ({"small_cnn", "preact_resnet18", "wrn"}, lambda: MODELS),
    "dataset": ({"digits", "mnist", "mnist_t10k", "cifar10", "cifar100", "synthetic"}, lambda: DATASETS),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_real_registries_hold_the_expected_names(kind):
    expected, load = EXPECTED[kind]
    reg = load()
    assert reg.kind == kind
    assert expected <= set(reg.names()), f"missing {kind}s: {sorted(expected - set(reg.names()))}"


def test_real_registry_suggests_on_typo():
    with pytest.raises(BenchError, match="Did you mean 'trades'"):
        DEFENSES.get("trade")
    with pytest.raises(BenchError, match="Did you mean 'pgd'"):
        ATTACKS.get("pdg")


def test_loading_twice_does_not_re_register():
    # importing the packages again must not trip the duplicate check
    before = len(DEFENSES), len(ATTACKS)
    importlib.import_module("defenses"), importlib.import_module("attacks")
    DEFENSES.load(), ATTACKS.load()
    assert (len(DEFENSES), len(ATTACKS)) == before


def test_plugins_are_imported_on_the_first_lookup(tmp_path, monkeypatch):
    package = tmp_path / "plugpkg"
    package.mkdir()
    (package / "__init__.py").write_text("from plugpkg import one  # noqa: F401\n")
    (package / "one.py").write_text("from test_registry_plugins import REG\n\n@REG.register('one')\ndef one():\n    return 1\n")
    (tmp_path / "test_registry_plugins.py").write_text(
        "from bench.core.registry import Registry\nREG = Registry('thing', plugins=('plugpkg',))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = importlib.import_module("test_registry_plugins").REG
    assert "plugpkg" not in sys.modules  # declaring the plugins imports nothing
    assert reg.get("one")() == 1 and "plugpkg.one" in sys.modules
    assert reg.names() == ["one"]


def test_temporary_registrations_are_undone():
    reg = Registry("thing")
    reg.register("kept")(lambda: 0)
    with reg.temporary():
        reg.register("gone")(lambda: 1)
        assert reg.names() == ["gone", "kept"]
    assert reg.names() == ["kept"]
    with pytest.raises(ZeroDivisionError):
        with reg.temporary():
            reg.register("gone")(lambda: 1)
            1 / 0
    assert reg.names() == ["kept"]


# --------------------------------------------------------------------------- build_config


@dataclass(frozen=True)
class Cfg:
    steps: int = 10
    eps: float = 0.1
    step_size: float | None = None
    random_start: bool = True
    loss: str = "ce"
    widths: tuple[int, ...] = (1, 2)


def test_build_config_defaults_and_values():
    assert build_config(Cfg, {}, "test") == Cfg()
    cfg = build_config(Cfg, {"steps": 3, "eps": 0.25, "random_start": False, "loss": "cw", "widths": [4, 5]}, "test")
    assert cfg == Cfg(steps=3, eps=0.25, random_start=False, loss="cw", widths=(4, 5))
    assert isinstance(cfg.widths, tuple)


def test_build_config_unknown_parameter_suggests():
    with pytest.raises(BenchError) as info:
        build_config(Cfg, {"stpes": 3}, "attack 'pgd'")
    message = str(info.value)
    assert "unknown parameter 'stpes' for attack 'pgd'" in message
    assert "Did you mean 'steps'?" in message
    assert "steps" in message and "random_start" in message  # lists the accepted parameters


@pytest.mark.parametrize("params", [
    {"steps": "10"}, {"steps": 2.5}, {"steps": True}, {"steps": None},
    {"eps": "abc"}, {"eps": True}, {"eps": None}, {"eps": "1/0"},
    {"random_start": 1}, {"random_start": "yes"},
    {"loss": 3},
    {"widths": 3}, {"widths": ["a"]},
    {"step_size": "x"},
])
def test_build_config_wrong_type_is_bench_error(params):
    with pytest.raises(BenchError, match=repr(next(iter(params)))):
        build_config(Cfg, params, "test")


def test_build_config_coerces_int_and_fraction_to_float():
    cfg = build_config(Cfg, {"eps": 1, "step_size": 2}, "test")
    assert cfg.eps == 1.0 and type(cfg.eps) is float
    assert cfg.step_size == 2.0 and type(cfg.step_size) is float
    assert build_config(Cfg, {"eps": "8/255"}, "test").eps == pytest.approx(8 / 255)
    assert build_config(Cfg, {"step_size": None}, "test").step_size is None


def test_build_config_on_real_configs():
    pgd = ATTACKS.get("pgd")(eps=1, norm="L2", steps=3)
    assert pgd.config.eps == 1.0 and type(pgd.config.eps) is float
    with pytest.raises(BenchError, match="Did you mean 'steps'"):
        ATTACKS.get("pgd")(stepz=3)
    with pytest.raises(BenchError, match="beta"):
        DEFENSES.get("trades")(beta="six")
    with pytest.raises(BenchError, match="Accepted: none"):
        DEFENSES.get("natural")(beta=1.0)


# --------------------------------------------------------------------------- threat models


@pytest.mark.parametrize("norm, eps", [
    ("Linf", -0.1), ("L2", -1e-9), ("Linf", 1.5), ("Linf", float("nan")), ("L2", float("nan")),
    ("L2", float("inf")), ("Linf", "8/255"), ("Linf", True), ("L1", 0.1), ("linf", 0.1), ("", 0.1),
])
def test_threat_model_refuses_bad_values(norm, eps):
    with pytest.raises(BenchError):
        ThreatModel(norm, eps)


def test_threat_model_accepts_valid_values():
    assert ThreatModel("Linf", 0.0).eps == 0.0
    assert ThreatModel("Linf", 1.0).eps == 1.0
    assert ThreatModel("L2", 3.0).eps == 3.0  # an L2 eps may exceed 1
    assert str(ThreatModel("Linf", 8 / 255)) == "Linf eps=8/255"
    assert str(ThreatModel("Linf", 0.3)) == "Linf eps=0.3"


def test_check_eps_messages():
    with pytest.raises(BenchError, match=">= 0"):
        check_eps(-0.5, "L2")
    with pytest.raises(BenchError, match="out of range for Linf"):
        check_eps(8, "Linf")
    with pytest.raises(BenchError, match="finite"):
        check_eps(float("nan"), "Linf")
    with pytest.raises(BenchError, match="accepted norms: Linf, L2"):
        check_norm("L1")
    assert check_eps(1, "L2") == 1.0 and type(check_eps(1, "L2")) is float


def test_attack_refuses_bad_threat():
    with pytest.raises(BenchError):
        ATTACKS.get("pgd")(norm="Linf", eps=2.0)
    with pytest.raises(BenchError):
        ATTACKS.get("fgsm")(norm="L1", eps=0.1)
    with pytest.raises(BenchError):
        ATTACKS.get("mim")(eps=-0.1)


def test_parse_eps():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(" 0.3") == 0.3
    assert parse_eps(1) == 1.0 and type(parse_eps(1)) is float
    assert parse_eps(0.5) == 0.5
    for bad in ["abc", "1/0", "8/", "/255", True, None, [8, 255]]:
        with pytest.raises(BenchError):
            parse_eps(bad)


def test_format_eps():
    assert format_eps(8 / 255) == "8/255"
    assert format_eps(2 / 255) == "2/255"
    assert format_eps(0.3) == "0.3"
    assert format_eps(0.5) == "0.5"
    assert parse_number(format_eps(8 / 255), "eps") == pytest.approx(8 / 255)


# --------------------------------------------------------------------------- models

MODEL_KWARGS = {"wrn": {"depth": 10, "width": 1}}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def build(name, **kwargs):
    return build_model(name, num_classes=10, input_shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD,
                       **{**MODEL_KWARGS.get(name, {}), **kwargs})


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_outputs_logits(name):
    torch.manual_seed(0)
    model = build(name)
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    first_name, first = next(iter(model.named_children()))
    assert first_name == "normalize" and isinstance(first, Normalize)
    assert model.spec["name"] == name and model.spec["num_classes"] == 10


def test_normalization_is_inside_the_model():
    torch.manual_seed(0)
    model = build("small_cnn").eval()
    norm = model.normalize
    # mean/std are buffers: saved in the state dict, moved with the model, not trained
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    assert not any(p is norm.mean or p is norm.std for p in model.parameters())
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    with torch.no_grad():
        before = model(x)
        norm.mean.fill_(0.9)
        after = model(x)
    assert (before - after).abs().max() > 1e-4


def test_model_from_spec_rebuilds_the_same_function():
    torch.manual_seed(0)
    model = build("wrn").eval()
    copy = build_model_from_spec(model.spec)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


def test_model_bad_arguments_are_bench_errors():
    with pytest.raises(BenchError, match="6n\\+4"):
        build("wrn", depth=12)
    with pytest.raises(BenchError) as info:
        build("small_cnn", depth=3)
    assert "'depth'" in str(info.value) and "model 'small_cnn'" in str(info.value)
    with pytest.raises(BenchError, match="Did you mean 'small_cnn'"):
        build_model("small_cn", num_classes=10, input_shape=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD)


@pytest.mark.parametrize("was_training", [True, False])
def test_eval_mode_restores_the_previous_mode(was_training):
    model = build("wrn")
    model.train(was_training)
    with eval_mode(model) as m:
        assert m is model
        assert not any(module.training for module in model.modules())
    assert all(module.training == was_training for module in model.modules())


def test_eval_mode_restores_on_error():
    model = build("small_cnn").train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert model.training
