"""SAT-R1, R2, R3 (Vivek & Babu 2020): each loss recomputed from the paper's equation with
independently generated FGSM / I-FGSM / R+FGSM examples, gradients included, and R3's monotonicity
penalty zero on a model whose loss grows with ε and positive on one whose loss does not."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.defense import DEFENSES

B, EPS = 32, 0.1


@pytest.fixture
def model(trained):
    """A private copy of the trained tiny CNN, in train mode as the trainer hands it over."""
    return trained


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic.train_x[:B].clone(), synthetic.train_y[:B].clone()


def grad_x(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y), x)[0]


def fgsm(model, x, y, size):
    """x + size·sign ∇ₓCE(x), clipped to [0, 1] (Eq. (1))."""
    return (x + size * grad_x(model, x, y).sign()).clamp(0, 1)


def ifgsm(model, x, y, steps):
    """I-FGSM (Eq. (4)-(5)): `steps` signed steps of ε/steps from x."""
    for _ in range(steps):
        x = (x + EPS / steps * grad_x(model, x, y).sign()).clamp(0, 1)
    return x


def assert_same_loss_and_gradient(model, loss, expected):
    """The same loss (to 1e-5 relative) and the same parameter gradients: each entry to 1e-3
    relative or to 1e-4 of the largest entry. An entry is a float32 sum, over the batch and the
    positions, of terms that largely cancel, and the two sides group them differently (SAT-R2's
    one forward of both examples against two here), so its rounding scales with the gradient's
    size, not the entry's: measured up to 8e-6 of the largest entry on SAT-R2 (whose λ = 25 term
    makes entries of ~500; on the trained model that AVX-512 kernels make, an entry of 0.0096 was
    4.7e-5 off), 2e-6 with AVX2 kernels, and 2e-6 on SAT-R1."""
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4 * scale)


def test_paper_defaults():
    r1, r2, r3 = (DEFENSES.get(f"sat_r{i}")().config for i in (1, 2, 3))
    assert (r1.lam, r1.pairs, r1.ifgsm_steps) == (0.2, 1, 7)
    assert (r2.lam, r2.rand_ratio * 8 / 255) == (25.0, pytest.approx(2 / 255))
    assert (r3.lam, r3.tau, r3.low_ratio * 8 / 255) == (1.0, 0.6, pytest.approx(2 / 255))


# --------------------------------------------------------------------------- SAT-R1


@pytest.mark.parametrize("pairs", [1, 3])
def test_sat_r1_loss_is_equation_14(pairs, model, data, make_ctx):
    """mean CE on x_fgsm + λ·mean over the last k samples of ‖g(x_fgsm) − g(x_ifgsm)‖² (logits)."""
    x, y = data
    loss = DEFENSES.get("sat_r1")(pairs=pairs).training_step(model, x, y, make_ctx(model, eps=EPS))
    x_fgsm, x_ifgsm = fgsm(model, x, y, EPS), ifgsm(model, x[-pairs:], y[-pairs:], 7)
    assert (x_ifgsm - x[-pairs:]).abs().max() <= EPS + 1e-6
    logits = model(x_fgsm)
    penalty = (logits[-pairs:] - model(x_ifgsm)).pow(2).sum(1).mean()
    assert penalty > 0.1  # the two examples differ enough for the term to be tested
    assert_same_loss_and_gradient(model, loss, F.cross_entropy(logits, y) + 0.2 * penalty)


# --------------------------------------------------------------------------- SAT-R2


def test_sat_r2_loss_is_equation_15(model, data, make_ctx):
    """mean CE on x_fgsm + λ·mean ‖g(x_fgsm) − g(x_rfgsm)‖², R+FGSM from x + α·sign(N(0, I)) with a
    step of ε − α (Eq. (2)-(3)), α = ε/4."""
    x, y = data
    inputs = []
    handle = model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    torch.manual_seed(1)
    loss = DEFENSES.get("sat_r2")().training_step(model, x, y, make_ctx(model, eps=EPS))
    handle.remove()

    alpha = EPS / 4
    torch.manual_seed(1)
    start = (x + alpha * torch.randn_like(x).sign()).clamp(0, 1)
    assert torch.equal(inputs[1], start)
    x_rfgsm = (start + (EPS - alpha) * grad_x(model, start, y).sign()).clamp(0, 1)
    assert (x_rfgsm - x).abs().max() <= EPS + 1e-6
    logits_fgsm, logits_rfgsm = model(fgsm(model, x, y, EPS)), model(x_rfgsm)
    penalty = (logits_fgsm - logits_rfgsm).pow(2).sum(1).mean()
    assert 25 * penalty > F.cross_entropy(logits_fgsm, y)  # the regularizer dominates at λ = 25
    assert_same_loss_and_gradient(model, loss, F.cross_entropy(logits_fgsm, y) + 25 * penalty)


# --------------------------------------------------------------------------- SAT-R3


def r3_terms(model, x, y, low_ratio=0.25):
    """(loss at ε_low, loss at ε_high): batch-mean CE at the FGSM points of the two sizes, both
    along the sign of the gradient at x."""
    sign = grad_x(model, x, y).sign()
    return tuple(F.cross_entropy(model((x + size * sign).clamp(0, 1)), y) for size in (low_ratio * EPS, EPS))


def test_sat_r3_penalty_is_zero_when_the_loss_grows_with_eps(model, data, make_ctx):
    """On the trained (non-robust) CNN the loss grows steeply along the FGSM direction, so
    loss_low ≤ τ·loss_high and Eq. (16) is the FGSM cross-entropy at ε_high alone."""
    x, y = data
    loss = DEFENSES.get("sat_r3")().training_step(model, x, y, make_ctx(model, eps=EPS))
    low, high = r3_terms(model, x, y)
    assert low < 0.6 * high
    assert_same_loss_and_gradient(model, loss, high)


class Periodic(nn.Module):
    """A model that masks gradients: logit 0 is A·cos(ω·mean(x)), the others 0. With ω·ε = 2π the
    FGSM point at ε_high lands one period away, back at the clean loss, while ε_low = ε/4 goes a
    quarter period, up the loss: the loss is not monotone in ε."""

    def __init__(self):
        super().__init__()
        self.amplitude = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        z = self.amplitude * torch.cos(2 * math.pi / EPS * x.flatten(1).mean(1))
        return torch.stack([z, *[torch.zeros_like(z)] * 3], dim=1)


@pytest.mark.parametrize("tau", [0.6, 0.4])
def test_sat_r3_penalty_is_positive_when_the_loss_is_not_monotone(tau, make_ctx):
    model = Periodic()
    x = torch.full((8, 1, 4, 4), 0.5 + EPS / 8)  # phase π/4, away from the [0, 1] box
    y = torch.zeros(8, dtype=torch.long)
    loss = DEFENSES.get("sat_r3")(tau=tau).training_step(model, x, y, make_ctx(model, eps=EPS))
    low, high = r3_terms(model, x, y)
    assert low > 5 * high  # a quarter period up vs one full period: back to the clean loss
    assert_same_loss_and_gradient(model, loss, high + (low - tau * high))
