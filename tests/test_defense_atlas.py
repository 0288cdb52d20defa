"""ATLAS and zero-step JAC: the random-projection Jacobian estimate against the exact Frobenius
norm, the losses recomputed from the paper's equations, the adversary and the ε ramp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import defenses.atlas
from bench.adversary.regularizers import jacobian_norm_sq
from bench.core.defense import DEFENSES, TrainContext
from bench.core.errors import BenchError

B = 8


@pytest.fixture
def model(trained):
    """A private copy of the trained tiny CNN (no BatchNorm, so per-sample Jacobians are exact), in train mode."""
    return trained


@pytest.fixture(scope="module")
def train_batch(synthetic):
    return synthetic.train_x[:B].clone(), synthetic.train_y[:B].clone()


def exact_jacobian_sq(model, x, create_graph=False):
    """Per-sample ‖∂f(x)/∂x‖²_F from the full Jacobian (the diagonal blocks of the train_batch Jacobian)."""
    jac = torch.autograd.functional.jacobian(model, x, create_graph=create_graph)  # (B, C, B, *x.shape[1:])
    idx = torch.arange(len(x))
    return jac[idx, :, idx].flatten(1).pow(2).sum(1)


def coordinate_directions(monkeypatch):
    """Make the estimator's random directions the coordinate vectors e_1, e_2, ... in turn: with
    `projections` = C the estimate C·mean_k ‖e_kᵀJ‖² is then exactly ‖J‖²_F."""
    calls = []

    def fake_randn_like(t, **kwargs):
        v = torch.zeros_like(t)
        v[:, len(calls) % t.shape[1]] = 1.0
        calls.append(1)
        return v

    monkeypatch.setattr(torch, "randn_like", fake_randn_like)
    return calls


def grads(model):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_same_grads(model, got, expected_loss, rtol=1e-4):
    model.zero_grad(set_to_none=True)
    expected_loss.backward()
    for g, e in zip(got, grads(model)):
        torch.testing.assert_close(g, e, rtol=rtol, atol=1e-5)


# --------------------------------------------------------------------------- the estimator


def test_estimate_is_unbiased_for_the_exact_frobenius_norm(model, train_batch):
    """Random unit directions: the average of C·‖vᵀJ‖² over 500 draws is within 20% of the exact
    ‖J‖²_F for every sample (one draw's relative std is at most 1 for C = 4, so ~4.5% here)."""
    x, _ = train_batch
    exact = exact_jacobian_sq(model, x)
    torch.manual_seed(0)
    xr = x.clone().requires_grad_(True)
    estimate = jacobian_norm_sq(model(xr), xr, projections=500).detach()
    assert ((estimate / exact - 1).abs() < 0.2).all(), (estimate, exact)
    assert abs(estimate.mean() / exact.mean() - 1) < 0.08


def test_estimate_and_its_parameter_gradient_are_exact_on_coordinate_directions(model, train_batch, monkeypatch):
    """With v = e_1..e_C the estimate is ‖J‖²_F exactly, and double backprop gives the exact
    parameter gradient of ‖J‖²_F."""
    x, _ = train_batch
    calls = coordinate_directions(monkeypatch)
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    estimate = jacobian_norm_sq(logits, xr, projections=logits.shape[1])
    assert len(calls) == logits.shape[1]
    estimate.mean().backward()
    got = grads(model)
    assert sum(g.abs().sum() for g in got) > 0
    exact = exact_jacobian_sq(model, x, create_graph=True)
    torch.testing.assert_close(estimate, exact, rtol=1e-4, atol=1e-3)
    assert_same_grads(model, got, exact.mean())


# --------------------------------------------------------------------------- jacobian_reg


def test_jacobian_reg_loss(model, train_batch, make_ctx, monkeypatch):
    """CE(f(x), y) + α·mean ‖J(x)‖²_F, with the gradient of both terms."""
    x, y = train_batch
    alpha = 1e-3
    coordinate_directions(monkeypatch)
    loss = DEFENSES.get("jacobian_reg")(alpha=alpha, projections=4).training_step(model, x, y, make_ctx(model))
    loss.backward()
    got = grads(model)
    ce = F.cross_entropy(model(x), y)
    penalty = exact_jacobian_sq(model, x, create_graph=True).mean()
    assert alpha * penalty > 10 * ce  # the penalty dominates the trained model's loss
    torch.testing.assert_close(loss, ce + alpha * penalty, rtol=1e-5, atol=1e-5)
    assert_same_grads(model, got, ce + alpha * penalty)


def test_jacobian_reg_defaults():
    c = DEFENSES.get("jacobian_reg")().config
    assert (c.alpha, c.projections) == (0.5, 1)  # App. B: α_JAC = 0.5; Sec. 5.1: one projection
    with pytest.raises(BenchError):
        DEFENSES.get("jacobian_reg")(projections=0)


# --------------------------------------------------------------------------- atlas: ε ramp


def ctx_at(make_ctx, model, step, epochs=30, steps_per_epoch=10, eps=0.1):
    ctx: TrainContext = make_ctx(model, eps=eps)
    ctx.epochs, ctx.steps_per_epoch, ctx.step = epochs, steps_per_epoch, step
    return ctx


@pytest.mark.parametrize("epochs, step, scale", [
    (30, 0, 0.0), (30, 75, 0.5), (30, 149, 149 / 150), (30, 150, 1.0), (30, 299, 1.0),  # 15 of 30 epochs
    (10, 25, 0.5), (10, 50, 1.0),  # a 10-epoch budget ramps over 5 epochs
])
def test_atlas_eps_ramp(epochs, step, scale, model, make_ctx):
    atlas = DEFENSES.get("atlas")()
    assert atlas.eps_scale(ctx_at(make_ctx, model, step, epochs)) == pytest.approx(scale)
    assert DEFENSES.get("atlas")(ramp_epochs=0).eps_scale(ctx_at(make_ctx, model, 0, epochs)) == 1.0


def test_atlas_starts_as_natural_training(model, train_batch, make_ctx):
    """At the first step ε = 0: x' = x and the scaled α, β vanish, so the loss is CE(f(x), y)."""
    x, y = train_batch
    loss = DEFENSES.get("atlas")().training_step(model, x, y, ctx_at(make_ctx, model, 0))
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))


# --------------------------------------------------------------------------- atlas: loss and adversary


def kl(p_logits, q_logits):
    """Per-sample KL(softmax(p) ‖ softmax(q))."""
    log_p, log_q = F.log_softmax(p_logits, dim=1), F.log_softmax(q_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


@pytest.mark.parametrize("step, scale", [(75, 0.5), (200, 1.0)])
def test_atlas_loss_is_eq14(step, scale, model, train_batch, make_ctx, monkeypatch):
    """For a fixed x' (pgd patched): CE(f(x'), y) + s·(α·mean ‖J(x')‖²_F + β·mean KL(p(x') ‖ p(x))),
    s = ε_t/ε, with gradients through every term; the adversary gets ε_t and step 1.25·ε_t."""
    x, y = train_batch
    eps, alpha, beta = 0.1, 1e-3, 5.0
    g = torch.Generator().manual_seed(0)
    x_fixed = (x + scale * eps * torch.randint(0, 2, x.shape, generator=g).float().mul(2).sub(1)).clamp(0, 1)
    calls = []

    def fake_pgd(m, x_, loss_fn, **kwargs):
        calls.append(dict(kwargs, training=m.training, loss_fn=loss_fn))
        return x_fixed

    monkeypatch.setattr(defenses.atlas, "pgd", fake_pgd)
    coordinate_directions(monkeypatch)
    atlas = DEFENSES.get("atlas")(alpha=alpha, beta=beta, projections=4)
    loss = atlas.training_step(model, x, y, ctx_at(make_ctx, model, step, eps=eps))
    loss.backward()
    got = grads(model)

    (call,) = calls
    assert call["training"] is True
    assert (call["norm"], call["steps"]) == ("Linf", 1)
    assert call["eps"] == pytest.approx(scale * eps) and call["step_size"] == pytest.approx(1.25 * scale * eps)
    start_offset = (call["x_init"] - x).abs().max()
    assert 0.5 * scale * eps < start_offset <= scale * eps + 1e-6  # uniform random start in the ε_t ball
    some_logits = torch.randn(B, 4, generator=g)
    torch.testing.assert_close(call["loss_fn"](some_logits), F.cross_entropy(some_logits, y, reduction="none"))

    logits, logits_adv = model(x), model(x_fixed)
    jac = exact_jacobian_sq(model, x_fixed, create_graph=True).mean()
    global_term = kl(logits_adv, logits).mean()
    expected = F.cross_entropy(logits_adv, y) + scale * (alpha * jac + beta * global_term)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # each choice is visible at this tolerance: the KL's direction and where J is taken
    with torch.no_grad():
        assert (beta * (kl(logits, logits_adv).mean() - global_term)).abs() > 1e-2
        assert (alpha * (exact_jacobian_sq(model, x).mean() - jac)).abs() > 1e-2
    assert_same_grads(model, got, expected, rtol=1e-3)


def record_inputs(model):
    inputs = []
    handle = model.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    return inputs, handle


@pytest.mark.parametrize("steps, step_ratio", [(1, 1.25), (3, 0.007 / 0.031)])
def test_atlas_adversary(steps, step_ratio, model, train_batch, make_ctx):
    """x' is FGSM with a uniform random start and step 1.25ε (one-step), or PGD from a random start
    (multi-step variant), written out here; then f(x') and f(x)."""
    x, y = train_batch
    eps = 0.1
    inputs, handle = record_inputs(model)
    torch.manual_seed(3)
    DEFENSES.get("atlas")(steps=steps, step_ratio=step_ratio).training_step(model, x, y,
                                                                          ctx_at(make_ctx, model, 300, eps=eps))
    handle.remove()
    assert len(inputs) == steps + 2 and torch.equal(inputs[-1], x)

    torch.manual_seed(3)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = (x + (x_adv.detach() + step_ratio * eps * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    assert (inputs[-2] - x_adv).abs().max() <= 1e-6
    assert (inputs[-2] - x).abs().max() == pytest.approx(eps, abs=1e-6)


def test_atlas_defaults():
    c = DEFENSES.get("atlas")().config
    # App. B (CIFAR-10, one-step): α = 2e-4, β = 5; App. B.1: FGSM step 1.25ε; Sec. 6: ramp over 15 epochs
    assert (c.alpha, c.beta, c.steps, c.step_ratio, c.projections) == (2e-4, 5.0, 1, 1.25, 1)
    assert (c.ramp_epochs, c.paper_epochs) == (15.0, 30.0)
    with pytest.raises(BenchError):
        DEFENSES.get("atlas")(paper_epochs=0)
