"""Mechanism tests of the baselines eat, dat, cat, awp and gairat, each recomputed independently of
the defense's code (test_defenses.py covers one step, one trainer epoch, modes and passes)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.defense import DEFENSES
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.engine.counting import count_passes
from defenses.dat import fosc
from defenses.gairat import gair_weights

B = 32
EPS = 0.1


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic.train_x[:B].clone(), synthetic.train_y[:B].clone()



def at_epoch(ctx, epoch: int, epochs: int):
    ctx.epoch, ctx.epochs = epoch, epochs
    return ctx


def record_forwards(model):
    """Returns (inputs, handle): a copy of each forward's input."""
    inputs = []
    handle = model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    return inputs, handle


def input_grad(model, x, loss_fn):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(loss_fn(model(x)).sum(), x)[0]


def linf_step(x_adv, x, grad, step, eps):
    return (x + (x_adv + step * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)


def uniform_start(x, eps):
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)


def test_paper_defaults():
    cfg = {name: DEFENSES.get(name)().config for name in ("eat", "dat", "cat", "awp", "gairat")}
    assert (cfg["eat"].static_models, cfg["eat"].clean_weight) == (("same", "same"), 0.5)
    assert (cfg["dat"].c_max, cfg["dat"].steps, cfg["dat"].step_ratio) == (0.5, 10, 0.25)
    assert cfg["dat"].control_fraction * 120 == pytest.approx(100)
    assert (cfg["cat"].max_steps, cfg["cat"].step_budget, cfg["cat"].step_spread) == (7, 2.0, 10.0)
    assert (cfg["awp"].base, cfg["awp"].gamma, cfg["awp"].steps, cfg["awp"].step_ratio) == ("pgd_at", 1e-2, 10, 0.25)
    assert cfg["awp"].start_fraction == 0.0 and cfg["awp"].beta == 6.0
    trades_awp = DEFENSES.get("awp")(base="trades").config
    assert trades_awp.gamma == 5e-3 and trades_awp.start_fraction * 200 == pytest.approx(9)
    assert DEFENSES.get("awp")(base="trades", gamma=5e-3, start_fraction=9 / 200).params() == dataclasses.asdict(trades_awp)
    assert DEFENSES.get("awp")(base="trades", gamma=0.02).config.start_fraction == trades_awp.start_fraction
    assert (cfg["gairat"].steps, cfg["gairat"].lam) == (10, -1.0)
    assert cfg["gairat"].step_ratio * 0.031 == pytest.approx(0.007)
    assert cfg["gairat"].begin_fraction * 120 == pytest.approx(59)
    with pytest.raises(BenchError, match="unknown base 'mart'. Accepted: pgd_at, trades"):
        DEFENSES.get("awp")(base="mart")


# --------------------------------------------------------------------------- eat


class FakePretrained:
    """Records ctx.pretrained calls and returns a fresh tiny model for each."""

    def __init__(self, ds, seed):
        self.ds, self.seed, self.calls = ds, seed, []

    def __call__(self, defense, **kwargs):
        self.calls.append((defense, kwargs))
        torch.manual_seed(len(self.calls))
        return build_model(kwargs.get("model", "small_cnn"), num_classes=4, input_shape=self.ds.input_shape,
                           mean=self.ds.mean, std=self.ds.std).eval().requires_grad_(False)


def test_eat_static_models_are_natural_runs_with_other_seeds(synthetic, tiny_model, make_ctx):
    ctx = make_ctx(tiny_model)
    ctx.pretrained = FakePretrained(synthetic, seed=7)
    defense = DEFENSES.get("eat")(static_models=("same", "mlp", "same"))
    defense.setup(tiny_model, ctx)
    # "same" keeps the run's architecture (no `model` given); seeds follow the run's seed
    assert ctx.pretrained.calls == [("natural", {"seed": 8}), ("natural", {"seed": 9, "model": "mlp"}),
                                    ("natural", {"seed": 10})]
    assert len(defense.static) == 3
    with pytest.raises(BenchError, match="mlpp"):
        DEFENSES.get("eat")(static_models=("mlpp",))
    with pytest.raises(BenchError, match="at least one"):
        DEFENSES.get("eat")(static_models=())
    with pytest.raises(BenchError, match="static_epochs"):
        DEFENSES.get("eat")(static_epochs=0)


def test_eat_static_budget_is_a_knob(synthetic, tiny_model, make_ctx):
    """`static_epochs` sets every static run's epochs (`train`); by default they have the run's own."""
    ctx = make_ctx(tiny_model)
    ctx.pretrained = FakePretrained(synthetic, seed=0)
    assert DEFENSES.get("eat")().config.static_epochs is None
    DEFENSES.get("eat")(static_models=("same", "mlp"), static_epochs=4).setup(tiny_model, ctx)
    assert ctx.pretrained.calls == [("natural", {"seed": 1, "train": {"epochs": 4}}),
                                    ("natural", {"seed": 2, "model": "mlp", "train": {"epochs": 4}})]


def fgsm_predicted(model, x, eps):
    """x + ε·sign ∇ₓCE(h(x), argmax h(x)), clipped to [0, 1]."""
    with torch.no_grad():
        labels = model(x).argmax(1)
    grad = input_grad(model, x, lambda z: F.cross_entropy(z, labels, reduction="none"))
    return (x + eps * grad.sign()).clamp(0, 1)


def test_eat_draws_the_source_uniformly_and_mixes_clean_and_fgsm(trained, data, make_ctx):
    """Each step's x_adv is the predicted-label FGSM example of exactly one source (a static model
    or the current one), drawn uniformly; loss = ½·CE(x) + ½·CE(x_adv). Only the trained model's
    passes are counted: 2 / 3 per sample from the current model (its clean forward is also
    back-propagated for ∇ₓ), 2 / 2 from a static one."""
    x, y = data
    ctx = make_ctx(trained, eps=EPS)
    defense = DEFENSES.get("eat")()
    defense.setup(trained, ctx)
    sources = defense.static + [trained]
    candidates = [fgsm_predicted(m, x, EPS) for m in sources]
    for i in range(3):
        for j in range(i):
            assert (candidates[i] - candidates[j]).abs().max() > 0.1
    # the static models are weakly trained: their predictions differ from y, so the labels matter
    true_grad = input_grad(sources[0], x, lambda z: F.cross_entropy(z, y, reduction="none"))
    with_true_labels = (x + EPS * true_grad.sign()).clamp(0, 1)
    assert (with_true_labels - candidates[0]).abs().amax(dim=(1, 2, 3)).gt(0.1).sum() >= 5

    counts = [0, 0, 0]
    for seed in range(30):
        inputs, handle = record_forwards(trained)
        torch.manual_seed(seed)
        with count_passes(trained) as counter:
            loss = defense.training_step(trained, x, y, ctx)
            loss.backward()
        handle.remove()
        trained.zero_grad()
        (source,) = [s for s, c in enumerate(candidates) if (inputs[-1] - c).abs().max() <= 1e-6]
        counts[source] += 1
        assert torch.equal(inputs[0], x)
        expected = 0.5 * F.cross_entropy(trained(x), y) + 0.5 * F.cross_entropy(trained(candidates[source]), y)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        assert (counter.forward, counter.backward) == ((2 * B, 3 * B) if source == 2 else (2 * B, 2 * B))
    assert min(counts) >= 5, counts


# --------------------------------------------------------------------------- dat


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_fosc_is_the_first_order_optimality_gap(norm):
    """c(x') = max over the ball of ⟨x'' − x', g⟩, reached at x'' = x + ε·sign g (Linf) or
    x + ε·g/‖g‖ (L2); zero at that maximizer, positive inside the ball."""
    g = torch.Generator().manual_seed(0)
    x, grad = torch.rand(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    eps = 0.3
    best = x + eps * (grad.sign() if norm == "Linf" else grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    x_adv = x + 0.5 * (best - x) * torch.rand(6, 1, 1, 1, generator=g)
    gap = ((best - x_adv) * grad).flatten(1).sum(1)
    torch.testing.assert_close(fosc(grad, x_adv, x, norm, eps), gap)
    torch.testing.assert_close(fosc(grad, best, x, norm, eps), torch.zeros(6), atol=1e-5, rtol=0)
    # no point of the ball does better than the maximizer
    other = x + eps * torch.rand(6, 1, 4, 4, generator=g).mul(2).sub(1)
    if norm == "L2":
        other = x + (other - x) / (other - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps
    assert (((other - x_adv) * grad).flatten(1).sum(1) <= gap + 1e-6).all()


def test_dat_threshold_decreases_linearly():
    """The authors' c_t = 0.5 − 0.5·t/100 (t the 0-based epoch of 120), read at the middle of the
    paper epochs each run epoch covers (bench.core.defense.paper_epoch): t = e − ½ at 120 epochs, so the
    values sit half an epoch's decay (0.0025) below the start-of-epoch rule's 0.5, 0.25, 0.005;
    c reaches 0 in the epoch whose middle passes T' = 100 (the 101st, as before)."""
    defense = DEFENSES.get("dat")()
    assert [defense.threshold(e, 120) for e in (1, 51, 100, 101, 120)] == pytest.approx(
        [0.4975, 0.2475, 0.0025, 0.0, 0.0])
    # other budgets: T' = 100/120 of training, paper time (e − ½)/E as a fraction of it
    assert [defense.threshold(e, 12) for e in (1, 6, 10, 11, 12)] == pytest.approx([0.475, 0.225, 0.025, 0.0, 0.0])
    assert defense.threshold(1, 1) == pytest.approx(0.5 * (1 - 0.5 * 120 / 100))
    with pytest.raises(BenchError, match="control_fraction"):
        DEFENSES.get("dat")(control_fraction=0.0)


def test_dat_stops_each_sample_when_its_fosc_reaches_the_threshold(tiny_model, data, make_ctx):
    """Recomputed with whole-batch PGD (eval mode) and a per-sample stop mask: a sample is checked
    before each step and stops for good once c(x^k) <= c_t; only checked samples cost passes.

    The stops must be spread (some samples never move, some run all steps, some stop in between)
    whatever the CPU's kernels: the model is the untrained one, whose weights come from the seeded
    initialization, so its FOSC values are the same on every CPU up to rounding (~1e-6 relative).
    Its FOSC values are all of a size (1e-3; they fall as PGD converges), so c_t = 0.00136 (c_max
    0.0016) and 3 steps split the 32 samples 4 / 7 / 21, every checked value at least 2% away from
    c_t (measured under AVX-512 and AVX2). (A trained model's FOSC values span 1e-20 to 5 and
    rarely cross any threshold during PGD; which ones do depends on the model, which training
    makes differently on different CPUs.)"""
    x, y = data
    model = tiny_model
    c_max, steps = 0.0016, 3
    ctx = at_epoch(make_ctx(model, eps=EPS), 1, 4)
    defense = DEFENSES.get("dat")(c_max=c_max, steps=steps)
    c_t = defense.threshold(1, 4)
    assert c_t == pytest.approx(c_max * (1 - (0.5 / 4) / (100 / 120)))  # paper time 1/8 of training
    inputs, handle = record_forwards(model)
    torch.manual_seed(0)
    with count_passes(model) as counter:
        loss = defense.training_step(model, x, y, ctx)
    handle.remove()
    assert model.training

    torch.manual_seed(0)
    x_adv = uniform_start(x, EPS)
    running = torch.ones(B, dtype=torch.bool)
    taken, checks = torch.zeros(B), 0
    model.eval()
    for _ in range(steps):
        grad = input_grad(model, x_adv, lambda z: F.cross_entropy(z, y, reduction="none"))
        gap = EPS * grad.flatten(1).abs().sum(1) - ((x_adv - x) * grad).flatten(1).sum(1)
        checks += int(running.sum())
        running &= gap > c_t
        x_adv = torch.where(running.view(-1, 1, 1, 1), linf_step(x_adv, x, grad, EPS / 4, EPS), x_adv)
        taken += running.float()
    model.train()

    assert (inputs[-1] - x_adv).abs().max() <= 1e-6
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y), rtol=1e-5, atol=1e-6)
    assert counter.forward == checks + B
    # the stops are spread: some samples never move, some run all steps, some stop in between
    assert (taken == 0).sum() >= 3 and (taken == steps).sum() >= 3 and ((taken > 0) & (taken < steps)).sum() >= 3


def test_dat_large_threshold_keeps_the_random_start(trained, data, make_ctx):
    x, y = data
    inputs, handle = record_forwards(trained)
    torch.manual_seed(0)
    with count_passes(trained) as counter:
        DEFENSES.get("dat")(c_max=1e6).training_step(trained, x, y, make_ctx(trained, eps=EPS))
    handle.remove()
    torch.manual_seed(0)
    assert torch.equal(inputs[-1], uniform_start(x, EPS))
    assert counter.forward == 2 * B  # one FOSC check per sample, then f(x')


# --------------------------------------------------------------------------- cat


def test_cat_lessons_run_from_clean_to_full_strength():
    """l = round((e − 1)·K/(E − 1)), half up (K for a 1-epoch run): monotone, clean at epoch 1, and
    the last epoch always at full strength K, also when E < K + 1 (the earlier ⌊(e − 1)(K + 1)/E⌋
    split never reached K then, e.g. ended at l = 4 on 2 epochs, and trained a 1-epoch run clean)."""
    defense = DEFENSES.get("cat")()
    assert [defense.strength(e, 16) for e in range(1, 17)] == [k for k in range(8) for _ in range(2)]
    assert defense.strength(1, 1) == 7
    assert [defense.strength(e, 2) for e in (1, 2)] == [0, 7]
    assert [defense.strength(e, 3) for e in (1, 2, 3)] == [0, 4, 7]  # 3.5 rounds up
    for epochs in range(2, 30):
        lessons = [defense.strength(e, epochs) for e in range(1, epochs + 1)]
        assert lessons == sorted(lessons) and lessons[0] == 0 and lessons[-1] == 7, epochs
    lessons = [defense.strength(e, 120) for e in range(1, 121)]
    # inner lessons of (E − 1)/K = 17 epochs, the first and the last half that
    assert [lessons.count(k) for k in range(8)] == [9] + [17] * 6 + [9]
    with pytest.raises(BenchError, match="max_steps"):
        DEFENSES.get("cat")(max_steps=0)


def test_cat_batch_mixing(trained, data, make_ctx):
    """At strength 3 a batch of 30 is cut in parts of ⌊30/4⌋ = 7: clean, PGD-1, PGD-2, and PGD-3 for
    the last 9; PGD-i from a uniform start, i steps of (2ε/i)·u, u ~ U(1, 10/i); then CE of the mix."""
    x, y = data[0][:30], data[1][:30]
    parts = {1: slice(7, 14), 2: slice(14, 21), 3: slice(21, 30)}
    ctx = at_epoch(make_ctx(trained, eps=EPS), 4, 8)  # round(3·7/7) = 3
    inputs, handle = record_forwards(trained)
    torch.manual_seed(0)
    with count_passes(trained) as counter:
        loss = DEFENSES.get("cat")().training_step(trained, x, y, ctx)
    handle.remove()
    assert [len(i) for i in inputs] == [7, 7, 7, 9, 9, 9, 30]
    assert counter.forward == 1 * 7 + 2 * 7 + 3 * 9 + 30
    x_mix = inputs[-1]
    assert torch.equal(x_mix[:7], x[:7])

    torch.manual_seed(0)
    for i, part in parts.items():
        u = torch.empty(()).uniform_(1.0, 10.0 / i).item()
        x_i = uniform_start(x[part], EPS)
        for _ in range(i):
            grad = input_grad(trained, x_i, lambda z: F.cross_entropy(z, y[part], reduction="none"))
            x_i = linf_step(x_i, x[part], grad, 2 * EPS * u / i, EPS)
        assert (x_mix[part] - x_i).abs().max() <= 1e-6, i
    torch.testing.assert_close(loss, F.cross_entropy(trained(x_mix), y), rtol=1e-5, atol=1e-6)
    # PGD-1 takes one step of at least 2ε: every coordinate not clipped by [0, 1] ends on the boundary
    delta, free = x_mix[parts[1]] - x[parts[1]], (x_mix[parts[1]] > 0) & (x_mix[parts[1]] < 1)
    assert free.float().mean() > 0.5 and ((delta[free].abs() - EPS).abs() <= 1e-6).all()


def test_cat_batch_smaller_than_the_parts_goes_to_the_strongest(trained, data, make_ctx):
    x, y = data
    inputs, handle = record_forwards(trained)
    DEFENSES.get("cat")().training_step(trained, x[:2], y[:2], at_epoch(make_ctx(trained, eps=EPS), 4, 8))
    handle.remove()
    assert [len(i) for i in inputs] == [2, 2, 2, 2]


# --------------------------------------------------------------------------- awp


def base_objective(model, base, x, x_adv, y, beta=6.0):
    if base == "pgd_at":
        return F.cross_entropy(model(x_adv), y)
    log_p, log_q = F.log_softmax(model(x), dim=1), F.log_softmax(model(x_adv), dim=1)
    return F.cross_entropy(model(x), y) + beta * (log_p.exp() * (log_p - log_q)).sum(1).mean()


def expected_perturbation(model, base, x, x_adv, y, gamma):
    weights = [p for p in model.parameters() if p.dim() > 1]
    grads = torch.autograd.grad(base_objective(model, base, x, x_adv, y), weights)
    return [gamma * w.norm() / g.norm() * g for w, g in zip(weights, grads)]


@pytest.mark.parametrize("base, adv_index", [("pgd_at", 10), ("trades", 12)])
def test_awp_perturbs_every_weight_by_gamma_of_its_norm(base, adv_index, trained, data, make_ctx):
    """v_l = γ‖w_l‖·∇_{w_l}ρ/‖∇_{w_l}ρ‖ at the unperturbed weights (biases untouched), and the returned
    loss is ρ at w + v, for both base methods."""
    x, y = data
    gamma = 0.02
    before = copy.deepcopy(trained)
    inputs, handle = record_forwards(trained)
    torch.manual_seed(0)
    loss = DEFENSES.get("awp")(base=base, gamma=gamma).training_step(trained, x, y, make_ctx(trained, eps=EPS))
    handle.remove()
    x_adv = inputs[adv_index]
    assert 0 < (x_adv - x).abs().max() <= EPS + 1e-6

    v = iter(expected_perturbation(before, base, x, x_adv, y, gamma))
    for (name, p), p0 in zip(trained.named_parameters(), before.parameters()):
        if p.dim() > 1:
            v_l = next(v)
            assert (v_l.norm() / p0.norm()).item() == pytest.approx(gamma, rel=1e-4)
            torch.testing.assert_close(p.detach(), p0.detach() + v_l, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(p, p0), name
    torch.testing.assert_close(loss, base_objective(trained, base, x, x_adv, y), rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - base_objective(before, base, x, x_adv, y).item()) > 1e-3


def test_awp_steps_from_the_perturbed_weights_then_removes_the_perturbation(trained, data, make_ctx):
    """w ← w + v − η∇ρ(w + v) − v: the update uses the gradient at w + v, and v is gone after on_step_end."""
    x, y = data
    lr = 0.05
    before = copy.deepcopy(trained)
    ctx = make_ctx(trained, eps=EPS)
    ctx.optimizer = torch.optim.SGD(trained.parameters(), lr=lr)
    defense = DEFENSES.get("awp")()
    inputs, handle = record_forwards(trained)
    torch.manual_seed(0)
    loss = defense.training_step(trained, x, y, ctx)
    handle.remove()
    perturbed = copy.deepcopy(trained)
    ctx.optimizer.zero_grad()
    loss.backward()
    ctx.optimizer.step()
    defense.on_step_end(trained, ctx)

    x_adv = inputs[10]
    at_perturbed = torch.autograd.grad(base_objective(perturbed, "pgd_at", x, x_adv, y), list(perturbed.parameters()))
    at_plain = torch.autograd.grad(base_objective(before, "pgd_at", x, x_adv, y), list(before.parameters()))
    for p, p0, g, g_plain in zip(trained.parameters(), before.parameters(), at_perturbed, at_plain):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * g, rtol=1e-5, atol=1e-6)
    assert max((g - g_plain).abs().max().item() for g, g_plain in zip(at_perturbed, at_plain)) > 1e-3
    defense.on_step_end(trained, ctx)  # nothing left to remove
    torch.testing.assert_close(list(trained.parameters())[0], list(before.parameters())[0] - lr * at_perturbed[0],
                               rtol=1e-5, atol=1e-6)


def test_awp_warm_up(trained, data, make_ctx):
    """While the run's epoch stands for a paper time before start_fraction (epoch e of E at (e − ½)/E,
    bench.core.schedules.paper_epoch) AWP is plain base training: weights untouched, 11 forward
    passes for PGD-AT. TRADES-AWP's default 9/200 starts AWP at epoch 10 of 200, as the authors' code
    (`epoch >= 10`, epochs counted from 1: 9 warm-up epochs); AT-AWP's code has no warm-up."""
    trades = DEFENSES.get("awp")(base="trades")
    assert [trades.active(e, 200) for e in (9, 10, 200)] == [False, True, True]
    assert [trades.active(e, 20) for e in (1, 2)] == [False, True]  # 0.025 < 0.045 <= 0.075
    assert trades.active(1, 1)
    assert DEFENSES.get("awp")().active(1, 200)
    defense = DEFENSES.get("awp")(start_fraction=10 / 200)
    assert [defense.active(e, 200) for e in (10, 11)] == [False, True]
    x, y = data
    before = copy.deepcopy(trained)
    inputs, handle = record_forwards(trained)
    torch.manual_seed(0)
    with count_passes(trained) as counter:
        loss = defense.training_step(trained, x, y, at_epoch(make_ctx(trained, eps=EPS), 10, 200))
    handle.remove()
    assert all(torch.equal(p, p0) for p, p0 in zip(trained.parameters(), before.parameters()))
    torch.testing.assert_close(loss, F.cross_entropy(trained(inputs[-1]), y))
    assert (counter.forward, counter.backward) == (11 * B, 10 * B)  # loss not back-propagated here


def test_awp_leaves_batchnorm_statistics_to_the_attack_and_the_loss(synthetic, data, make_ctx):
    """The weight-gradient pass (the authors' proxy model) does not update running statistics: they
    are those of the 10 PGD forwards at w and the loss forward at w + v."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 4))
    replay = copy.deepcopy(model)
    x, y = data
    inputs, handle = record_forwards(model)
    torch.manual_seed(0)
    DEFENSES.get("awp")().training_step(model, x, y, make_ctx(model, eps=EPS))
    handle.remove()
    assert len(inputs) == 12 and model[1].num_batches_tracked.item() == 11
    with torch.no_grad():
        for z in inputs[:10]:
            replay(z)
        for p_replay, p in zip(replay.parameters(), model.parameters()):
            p_replay.copy_(p)
        replay(inputs[11])
    torch.testing.assert_close(model[1].running_mean, replay[1].running_mean)
    torch.testing.assert_close(model[1].running_var, replay[1].running_var)


# --------------------------------------------------------------------------- gairat


def test_gair_weights():
    """ω = (1 + tanh(λ + 5(1 − 2κ/K)))/2, normalized to mean 1: decreasing in κ; λ → ∞ is uniform."""
    kappa = torch.arange(11.0)
    raw = torch.tensor([(1 + math.tanh(-1 + 5 * (1 - 2 * k / 10))) / 2 for k in range(11)])
    assert raw[0] == pytest.approx(0.99966, abs=1e-5) and raw[5] == pytest.approx(0.11920, abs=1e-5)
    w = gair_weights(kappa, 10, -1.0)
    torch.testing.assert_close(w, raw * 11 / raw.sum())
    assert w.mean().item() == pytest.approx(1.0) and (w[1:] < w[:-1]).all()
    torch.testing.assert_close(gair_weights(kappa, 10, 50.0), torch.ones(11))


def test_gairat_kappa_and_weighted_loss(trained, data, make_ctx):
    """κ counts the correctly classified iterates x⁰ … x^{K−1} of eval-mode PGD-10 (step 0.007/0.031·ε,
    uniform start); after the burn-in the loss is mean(ω·CE(x')), before it mean CE(x'). The burn-in
    holds while (e − ½)/E < begin_fraction (bench.core.schedules.paper_epoch): epochs 1-59 of 120, as
    the code, which counts epochs from 0 and reweights once `(epoch + 1) >= 60`."""
    x, y = data
    defense = DEFENSES.get("gairat")()
    assert [defense.reweighting(e, 120) for e in (59, 60)] == [False, True] and defense.reweighting(1, 1)
    inputs, handle = record_forwards(trained)
    torch.manual_seed(0)
    loss = defense.training_step(trained, x, y, make_ctx(trained, eps=EPS))
    torch.manual_seed(0)
    plain = defense.training_step(trained, x, y, at_epoch(make_ctx(trained, eps=EPS), 59, 120))
    handle.remove()

    torch.manual_seed(0)
    x_adv, kappa = uniform_start(x, EPS), torch.zeros(B)
    trained.eval()
    for _ in range(10):
        with torch.no_grad():
            kappa += (trained(x_adv).argmax(1) == y).float()
        grad = input_grad(trained, x_adv, lambda z: F.cross_entropy(z, y, reduction="none"))
        x_adv = linf_step(x_adv, x, grad, 0.007 / 0.031 * EPS, EPS)
    trained.train()
    assert (inputs[10] - x_adv).abs().max() <= 1e-6
    assert kappa.min() == 0 and kappa.max() == 10  # the weights differ across samples
    ce = F.cross_entropy(trained(x_adv), y, reduction="none")
    raw = (1 + torch.tanh(-1 + 5 * (1 - 2 * kappa / 10))) / 2
    torch.testing.assert_close(loss, (ce * raw * B / raw.sum()).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, ce.mean(), rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - plain.item()) > 0.1
