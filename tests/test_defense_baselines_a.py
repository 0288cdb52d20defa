"""ALP and Free-AT: the ALP loss recomputed from the paper and the authors' code, and Free-AT's
replays (Algorithm 1) written out and compared step by step, δ carried across batches of
different sizes and through a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import defenses.alp
from bench.core.defense import DEFENSES
from bench.core.errors import BenchError

B = 32


@pytest.fixture
def model(trained):
    """A private copy of the trained tiny CNN, in train mode."""
    return trained


@pytest.fixture(scope="module")
def batches(synthetic):
    """Three batches as the trainer cuts them: 32, 20 (a smaller last batch), 32."""
    x, y = synthetic.train_x, synthetic.train_y
    return [(x[:32], y[:32]), (x[32:52], y[32:52]), (x[64:96], y[64:96])]


# --------------------------------------------------------------------------- alp


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_alp_loss(weight, model, batches, make_ctx, monkeypatch):
    """For a fixed x̃ (pgd patched): mean CE over the mixed batch [x; x̃] + λ·mean over all logits
    of (f(x) − f(x̃))², from one train-mode forward of the mixed batch; x̃ comes from untargeted
    PGD in eval mode, 10 steps of ε/8 from a uniform random start."""
    x, y = batches[0]
    eps = 0.1
    g = torch.Generator().manual_seed(0)
    x_fixed = (x + eps * torch.randint(0, 2, x.shape, generator=g).float().mul(2).sub(1)).clamp(0, 1)
    calls = []

    def fake_pgd(m, x_, loss_fn, **kwargs):
        calls.append(dict(kwargs, training=m.training, loss_fn=loss_fn))
        return x_fixed

    monkeypatch.setattr(defenses.alp, "pgd", fake_pgd)
    inputs, modes = [], []

    def record(module, args):
        inputs.append(args[0].detach().clone())
        modes.append(module.training)

    handle = model.register_forward_pre_hook(record)
    loss = DEFENSES.get("alp")(pairing_weight=weight).training_step(model, x, y, make_ctx(model, eps=eps))
    handle.remove()
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]

    (call,) = calls
    assert call["training"] is False
    assert (call["eps"], call["norm"], call["steps"]) == (eps, "Linf", 10)
    assert call["step_size"] == pytest.approx(eps / 8)
    assert 0.5 * eps < (call["x_init"] - x).abs().max() <= eps + 1e-6
    some_logits = torch.randn(B, 4, generator=g)
    torch.testing.assert_close(call["loss_fn"](some_logits), F.cross_entropy(some_logits, y, reduction="none"))
    assert modes == [True] and torch.equal(inputs[0], torch.cat([x, x_fixed]))

    model.zero_grad(set_to_none=True)
    clean, adv = model(x), model(x_fixed)
    pairing = ((clean - adv) ** 2).sum(1).mean() / clean.shape[1]
    expected = 0.5 * (F.cross_entropy(clean, y) + F.cross_entropy(adv, y)) + weight * pairing
    assert pairing > 1.0  # the trained model's logits move under x̃: the pairing term is tested
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-4, atol=1e-6)


def test_alp_defaults():
    c = DEFENSES.get("alp")().config
    assert (c.pairing_weight, c.steps, c.step_ratio) == (0.5, 10, 2 / 16)  # pgd_16_2_10, train_lp_weight=0.5


# --------------------------------------------------------------------------- free_at


def trainer_step(defense, model, x, y, ctx):
    """What the trainer does with a batch: training_step, zero_grad, backward, step, on_step_end."""
    loss = defense.training_step(model, x, y, ctx)
    assert all(p.grad is None for p in model.parameters())
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ctx.optimizer.step()
    defense.on_step_end(model, ctx)
    return loss


def algorithm_1(model, optimizer, batches, m, eps):
    """Shafahi et al. 2019, Algorithm 1, written out: δ = 0 (one row per batch position); each
    batch is replayed m times, each replay one backward for ∇θ and ∇δ, δ ← clip(δ + ε·sign ∇δ, ±ε),
    one SGD step. Returns δ after each batch and the inputs the model saw."""
    delta = torch.zeros_like(batches[0][0])
    deltas, seen = [], []
    for x, y in batches:
        n = len(x)
        for _ in range(m):
            d = delta[:n].clone().requires_grad_(True)
            seen.append((x + d).clamp(0, 1).detach())
            loss = F.cross_entropy(model((x + d).clamp(0, 1)), y)
            optimizer.zero_grad()
            loss.backward()
            delta[:n] = (delta[:n] + eps * d.grad.sign()).clamp(-eps, eps)
            optimizer.step()
        deltas.append(delta.clone())
    return deltas, seen


def test_free_at_is_algorithm_1(model, batches, make_ctx):
    """m = 3 replays on three batches (the second smaller), with SGD momentum: the same parameters,
    the same inputs and the same carried δ as Algorithm 1 written out."""
    eps, m = 0.1, 3
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    deltas, seen = algorithm_1(reference, ref_opt, batches, m, eps)

    ctx = make_ctx(model, eps=eps)
    ctx.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    defense = DEFENSES.get("free_at")(replays=m)
    inputs = []
    handle = model.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()))
    for (x, y), expected_delta in zip(batches, deltas):
        trainer_step(defense, model, x, y, ctx)
        torch.testing.assert_close(defense.delta, expected_delta, rtol=0, atol=1e-6)
    handle.remove()

    assert len(inputs) == len(seen) == 3 * m
    for a, b in zip(inputs, seen):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    # δ is carried: batch 2's first replay saw batch 1's last δ; the short batch left rows 20.. alone
    x2 = batches[1][0]
    torch.testing.assert_close(inputs[m], (x2 + deltas[0][:20]).clamp(0, 1), rtol=0, atol=1e-6)
    assert torch.equal(deltas[1][20:], deltas[0][20:])
    assert (deltas[2].abs().max() - eps).abs() < 1e-6 and deltas[2].abs().mean() > 0.5 * eps


def test_free_at_state_survives_a_checkpoint(model, batches, make_ctx):
    """δ goes through state_dict: a resumed defense continues exactly as the uninterrupted one."""
    ctx = make_ctx(model)
    first = DEFENSES.get("free_at")(replays=2)
    trainer_step(first, model, *batches[0], ctx)
    resumed = DEFENSES.get("free_at")(replays=2)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert DEFENSES.get("free_at")().state_dict() == {}

    twin = copy.deepcopy(model)
    twin_ctx = make_ctx(twin)
    twin_ctx.optimizer.load_state_dict(ctx.optimizer.state_dict())
    x, y = batches[2]
    torch.testing.assert_close(trainer_step(first, model, x, y, ctx), trainer_step(resumed, twin, x, y, twin_ctx))
    torch.testing.assert_close(first.delta, resumed.delta)


def test_free_at_l2_stays_in_the_ball(model, batches, make_ctx):
    eps = 0.5
    ctx = make_ctx(model, norm="L2", eps=eps)
    defense = DEFENSES.get("free_at")(replays=2)
    trainer_step(defense, model, *batches[0], ctx)
    norms = defense.delta.flatten(1).norm(dim=1)
    assert (norms <= eps + 1e-5).all() and (norms > 0.9 * eps).all()


def test_free_at_defaults():
    c = DEFENSES.get("free_at")().config
    assert (c.replays, c.step_ratio) == (8, 1.0)  # m = 8 on CIFAR-10; Algorithm 1: step ε
    with pytest.raises(BenchError):
        DEFENSES.get("free_at")(replays=0)
