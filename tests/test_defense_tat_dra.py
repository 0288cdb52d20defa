"""Transfer AT with DRA (thesis ch. 4): the DRA perturbation (top-p support, unsigned gradient,
L1-type budget), the budget schedule, the 1:1 clean/DRA mix and the natural starting point."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bench.core.defense import DEFENSES
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.runspec import RunSpec, build_train_config
from bench.engine.trainer import train
from bench.store import Store
from defenses.tat_dra import dra
from tests.conftest import PRETRAIN, TINY, tiny_cnn

B = 32


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic.train_x[:B].clone(), synthetic.train_y[:B].clone()


def gradient(model, x, y):
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return grad.flatten(1)


def top_k_mask(values, k):
    idx = values.abs().topk(k, dim=1).indices
    mask = torch.zeros_like(values, dtype=torch.bool)
    for i in range(len(values)):
        mask[i, idx[i]] = True
    return mask


@pytest.mark.parametrize("p", [1 / 3, 2 / 3])
def test_dra_touches_only_the_top_p_values(p, trained_model, data):
    """The support of x' − x lies in the top-p values of |∇ₓ CE| at x; the per-sample L1 norm is at
    most ε·k and the budget is used; single values exceed ε (an L1 budget, not an L∞ ball)."""
    x, y = data
    budget = 0.05
    k = round(p * 64)
    x_dra = dra(trained_model, x, y, budget=budget, p=p, steps=5, step_size=0.5 * budget)
    delta = (x_dra - x).flatten(1)
    mask = top_k_mask(gradient(trained_model, x, y), k)

    assert not (delta[~mask] != 0).any()
    touched = (delta != 0).sum(1).float()
    assert touched.max() <= k and touched.mean() > 0.6 * k  # the rest sit on 0 or 1 and were pushed outward
    l1 = delta.abs().sum(1)
    assert (l1 <= budget * k * (1 + 1e-5)).all()
    assert l1.mean() > 0.9 * budget * k  # the budget is used; clipping to [0, 1] eats a little
    assert (delta.abs().amax(1) > 1.5 * budget).float().mean() > 0.5
    with torch.no_grad():
        assert F.cross_entropy(trained_model(x_dra), y) > F.cross_entropy(trained_model(x), y) + 0.3


def test_dra_step_follows_the_gradient_without_sign(trained_model, data):
    """One step: δ = η·k·g_M/‖g_M‖₁ on the top-k values M (then clipped to [0, 1]), proportional to
    the gradient, not to its sign."""
    x, y = data
    k, eta = round(64 / 3), 0.01
    x_dra = dra(trained_model, x, y, budget=1.0, p=1 / 3, steps=1, step_size=eta)
    grad = gradient(trained_model, x, y)
    g = torch.where(top_k_mask(grad, k), grad, torch.zeros_like(grad))
    expected = (x.flatten(1) + eta * k * g / g.abs().sum(1, keepdim=True)).clamp(0, 1).view_as(x)
    torch.testing.assert_close(x_dra, expected, rtol=0, atol=1e-6)
    free = (expected > 0) & (expected < 1) & (g.view_as(x) != 0)
    ratio = ((x_dra - x) / g.view_as(x))[free]  # δ/g: one positive constant per sample
    assert (ratio > 0).all()
    magnitudes = (x_dra - x).abs()[free]
    assert magnitudes.max() > 3 * magnitudes.min()


def test_budget_schedule():
    """CIFAR: 2/255 at paper epoch 0 → 0.5/255 at paper epoch 49, linear, then 10 clean epochs; epoch
    e of E is read at paper time t = (e − ½)·60/E (bench.core.defense.paper_epoch): adversarial while
    t < 50. MNIST: 0.1 throughout. The values changed from the earlier rule, which ran the decay over
    the run's own ceil(E·50/60) adversarial epochs: now every defense maps its schedule the same way,
    so the first epoch starts half an epoch into the decay and, on short budgets, the last
    adversarial epoch stops short of 0.5/255."""
    d = DEFENSES.get("tat_dra")()

    def decay(t):
        return (2 - 1.5 * min(t / 49, 1)) / 255

    assert d.budget_at(1, 60) == pytest.approx(decay(0.5))
    assert d.budget_at(25, 60) == pytest.approx(decay(24.5))
    assert d.budget_at(50, 60) == pytest.approx(0.5 / 255)  # the last adversarial epoch, as the thesis
    assert [d.budget_at(e, 60) for e in range(51, 61)] == [None] * 10
    # other budgets keep the proportion: 10 of 12 epochs adversarial
    assert [d.budget_at(e, 12) is None for e in range(1, 13)] == [False] * 10 + [True] * 2
    assert [d.budget_at(e, 12) for e in (1, 10)] == [pytest.approx(decay(2.5)), pytest.approx(decay(47.5))]
    budgets = [d.budget_at(e, 12) for e in range(1, 11)]
    assert budgets == sorted(budgets, reverse=True)
    assert d.budget_at(1, 1) == pytest.approx(decay(30))  # a 1-epoch run is adversarial
    assert [d.budget_at(e, 2) is None for e in (1, 2)] == [False, False]  # t = 15, 45: both adversarial
    assert [d.budget_at(e, 6) is None for e in range(1, 7)] == [False] * 5 + [True]  # t = 55 is clean
    mnist = DEFENSES.get("tat_dra")(steps=20, p=2 / 3, budget_start=0.1, budget_end=0.1, clean_epochs=0)
    assert [mnist.budget_at(e, 50) for e in (1, 25, 50)] == [pytest.approx(0.1)] * 3


def test_training_step_mixes_clean_and_dra_one_to_one(trained_model, data, make_ctx):
    """Adversarial epoch: one forward of [x; x_dra] (DRA at that epoch's budget), loss = ½(CE(x) + CE(x_dra)).
    Clean epoch: CE(x) alone."""
    model = copy.deepcopy(trained_model).train()
    x, y = data
    defense = DEFENSES.get("tat_dra")(budget_start=0.05, budget_end=0.01)
    ctx = make_ctx(model)
    ctx.epochs = 60
    k = round(64 / 3)
    for epoch, budget in [(1, 0.05 - 0.04 * 0.5 / 49), (50, 0.01)]:  # paper times 0.5 and 49.5
        ctx.epoch = epoch
        inputs, modes = [], []

        def record(module, args):
            inputs.append(args[0].detach().clone())
            modes.append(module.training)

        handle = model.register_forward_pre_hook(record)
        loss = defense.training_step(model, x, y, ctx)
        handle.remove()
        assert modes == [False] * 5 + [True]
        mixed = inputs[-1]
        assert mixed.shape[0] == 2 * B and torch.equal(mixed[:B], x)
        x_dra = mixed[B:]
        l1 = (x_dra - x).flatten(1).abs().sum(1)
        assert (l1 <= budget * k * (1 + 1e-5)).all() and l1.max() >= 0.98 * budget * k
        with torch.no_grad():
            expected = (F.cross_entropy(model(x), y) + F.cross_entropy(model(x_dra), y)) / 2
        torch.testing.assert_close(loss, expected)

    ctx.epoch = 51
    inputs.clear()
    handle = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    loss = defense.training_step(model, x, y, ctx)
    handle.remove()
    assert len(inputs) == 1 and torch.equal(inputs[0], x)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


def test_setup_starts_from_the_natural_checkpoint(synthetic, make_ctx):
    model = tiny_cnn(synthetic, seed=7)
    ctx = make_ctx(model)
    DEFENSES.get("tat_dra")().setup(model, ctx)
    natural = ctx.pretrained("natural")
    for (name, a), b in zip(model.state_dict().items(), natural.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in model.parameters()) and model.training
    fresh = tiny_cnn(synthetic, seed=7)
    assert not torch.equal(fresh.state_dict()["net.0.0.weight"], natural.state_dict()["net.0.0.weight"])


def test_pretraining_budget_is_a_knob(synthetic, make_ctx):
    model = tiny_cnn(synthetic)
    ctx = make_ctx(model)
    calls = []

    def fake_pretrained(defense, **kwargs):
        calls.append((defense, kwargs))
        return tiny_cnn(synthetic, seed=3)

    ctx.pretrained = fake_pretrained
    DEFENSES.get("tat_dra")().setup(model, ctx)
    DEFENSES.get("tat_dra")(pretrain_epochs=3).setup(model, ctx)
    assert calls == [("natural", {"train": None}), ("natural", {"train": {"epochs": 3}})]


def test_the_natural_start_carries_its_own_training_config(synthetic, make_ctx, tmp_path):
    """`RunSpec.pretrained_train` (a suite's [defenses.LABEL.pretrained.natural]) trains the natural
    start with its own config instead of TAT's: the trainer stores that natural run, the config is
    part of the TAT run's identity (and absent from it when not given), `pretrain_epochs` still
    overrides its epochs, and a run the defense does not train on demand is refused."""
    threat = ThreatModel("Linf", 0.1)
    natural_cfg = build_train_config({**PRETRAIN, "epochs": 2, "lr": 0.005})
    spec = RunSpec("tat_dra", "synthetic", "small_cnn", threat, build_train_config(PRETRAIN),
                   model_params=dict(TINY), pretrained_train={"natural": natural_cfg})
    alone = dataclasses.replace(spec, pretrained_train={})
    assert "pretrained_train" not in alone.canonical() and spec.run_id != alone.run_id
    train(spec, synthetic, store=Store(str(tmp_path / "results.db")), checkpoint_root=tmp_path, progress=False)
    natural = RunSpec("natural", "synthetic", "small_cnn", threat, natural_cfg, model_params=dict(TINY))
    assert (tmp_path / natural.run_id / "best.pt").exists()
    assert not (tmp_path / dataclasses.replace(natural, train=spec.train).run_id).exists()

    pretrained = dataclasses.replace(make_ctx(tiny_cnn(synthetic)).pretrained, dependency_train={"natural": natural_cfg})
    assert pretrained.spec("natural", train={"epochs": 3}).train == dataclasses.replace(natural_cfg, epochs=3)
    with pytest.raises(BenchError, match="trains no pretrained 'pgd_at' run"):
        dataclasses.replace(spec, pretrained_train={"pgd_at": natural_cfg}).canonical()


def test_paper_defaults_and_validation():
    c = DEFENSES.get("tat_dra")().config
    assert (c.steps, c.decay_epochs, c.clean_epochs) == (5, 50, 10)
    assert c.p == pytest.approx(1 / 3)
    assert (c.budget_start * 255, c.budget_end * 255) == (pytest.approx(2), pytest.approx(0.5))
    assert c.step_ratio is None and c.pretrain_epochs is None
    for bad in ({"p": 0.0}, {"p": 1.5}, {"steps": 0}, {"budget_end": -1.0}, {"pretrain_epochs": 0}):
        with pytest.raises(BenchError):
            DEFENSES.get("tat_dra")(**bad)
    assert math.isclose(DEFENSES.get("tat_dra")(budget_start="1/255").config.budget_start, 1 / 255)
