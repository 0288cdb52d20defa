"""SPAT (thesis ch. 3): the cosine-head requirement, the self-paced NCE loss and the robustness
loss recomputed from the equations, and the inner maximization on the robustness loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import defenses.spat
from conftest import fit
from bench.core.defense import DEFENSES
from bench.core.errors import BenchError
from defenses.spat import robustness_loss, self_paced_logits
from tests.conftest import tiny_cnn

B, S, BETA, ALPHA, LAM = 32, 5.0, 0.2, 0.2, 6.0


@pytest.fixture(scope="module")
def cosine_model(synthetic):
    """A tiny small_cnn with a cosine head after 40 Adam steps of NCE (CE on 5·cos θ), in train mode."""
    return fit(tiny_cnn(synthetic, head="cosine"), synthetic.train_x, synthetic.train_y, steps=40,
               loss=lambda logits, y: F.cross_entropy(S * logits, y)).train()


def test_setup_refuses_a_model_without_a_cosine_head(synthetic, make_ctx):
    model = tiny_cnn(synthetic)
    with pytest.raises(BenchError) as err:
        DEFENSES.get("spat")().setup(model, make_ctx(model))
    assert '[model] head = "cosine"' in str(err.value) and "--model-param head=cosine" in str(err.value)
    cosine = tiny_cnn(synthetic, head="cosine")
    DEFENSES.get("spat")().setup(cosine, make_ctx(cosine))


def test_self_paced_nce_is_equation_3_10():
    """−log(e^{g^t s cos θ_y} / (Σ_{j≠y} e^{g^f_j s cos θ_j} + e^{g^t s cos θ_y})), written out."""
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(6, 4, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    got = F.cross_entropy(self_paced_logits(cos, y, S, BETA), y, reduction="none")
    for i in range(6):
        t = int(y[i])
        true = math.exp((1 - cos[i, t].item() + BETA) * S * cos[i, t].item())
        false = sum(math.exp((cos[i, j].item() + BETA) * S * cos[i, j].item()) for j in range(4) if j != t)
        assert got[i].item() == pytest.approx(-math.log(true / (false + true)), rel=1e-5)


def test_self_paced_gains_reweight_hard_and_easy_class_pairs():
    """Against NCE (CE on s·cos θ): a hard false class (cos 0.6) is pushed away harder, easy ones
    (cos −0.2) less. The gains carry gradient (authors' code), so the true-class logit
    s(1 − cos + β)cos peaks at cos θ_y = (1 + β)/2 = 0.6, Fig. 3.4's threshold."""
    y = torch.tensor([0])

    def grads(loss_of):
        cos = torch.tensor([[0.3, 0.6, -0.2, -0.2]], requires_grad=True)
        loss_of(cos).backward()
        return cos.grad[0]

    sp = grads(lambda c: F.cross_entropy(self_paced_logits(c, y, S, BETA), y))
    nce = grads(lambda c: F.cross_entropy(S * c, y))
    assert sp[1] > nce[1] > 0
    assert abs(sp[2]) < abs(nce[2])

    for cos_y, sign in [(0.5, -1), (0.7, 1)]:
        cos = torch.tensor([[cos_y, 0.0, 0.0, 0.0]], requires_grad=True)
        F.cross_entropy(self_paced_logits(cos, y, S, BETA), y).backward()
        assert torch.sign(cos.grad[0, 0]) == sign  # the loss falls toward cos θ_y = 0.6 from both sides


def test_robustness_loss_is_equations_3_13_to_3_15():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g) * 3, torch.randn(5, 4, generator=g) * 3
    p, q = F.softmax(a, dim=1), F.softmax(b, dim=1)
    kl = (p * torch.log(p / q)).sum(1)
    inc = ((p * torch.log(p / q)) ** 2).sum(1)
    got = robustness_loss(F.log_softmax(a, dim=1), b, ALPHA)
    torch.testing.assert_close(got, ALPHA * kl + inc)
    assert (inc > 0).all() and (kl > 0).all()
    torch.testing.assert_close(robustness_loss(F.log_softmax(a, dim=1), a, ALPHA), torch.zeros(5), atol=1e-6, rtol=0)


def test_spat_loss_matches_the_thesis(cosine_model, synthetic, make_ctx, monkeypatch):
    """For a fixed x' (pgd patched): L = L_acc^sp(x) + λ(α·KL(f(x) ‖ f(x')) + L_inc), f = softmax(s·cos θ),
    with gradients through f(x) and f(x'); the inner max runs in eval mode on the same robustness loss."""
    model = cosine_model
    x, y = synthetic.train_x[:B], synthetic.train_y[:B]
    eps = 0.1
    g = torch.Generator().manual_seed(0)
    x_fixed = x.roll(1, 0)  # any fixed x' will do; another sample makes f(x') differ markedly from f(x)
    calls = []

    def fake_pgd(m, x_, loss_fn, **kwargs):
        calls.append(dict(kwargs, training=m.training, loss_fn=loss_fn, x=x_))
        return x_fixed

    monkeypatch.setattr(defenses.spat, "pgd", fake_pgd)
    ctx = make_ctx(model, eps=eps)
    defense = DEFENSES.get("spat")()
    defense.setup(model, ctx)
    loss = defense.training_step(model, x, y, ctx)

    (call,) = calls
    assert call["training"] is False
    assert (call["eps"], call["norm"], call["steps"]) == (eps, "Linf", 10)
    assert call["step_size"] == pytest.approx(eps / 4)
    assert torch.equal(call["x"], x)
    assert 0 < (call["x_init"] - x).abs().max() <= 0.01  # x + 0.001·N(0, I)
    with torch.no_grad():
        p = F.softmax(S * model(x), dim=1)
        some_cos = torch.rand(B, 4, generator=g) * 2 - 1
        q = F.softmax(S * some_cos, dim=1)
        expected_inner = ALPHA * (p * torch.log(p / q)).sum(1) + ((p * torch.log(p / q)) ** 2).sum(1)
    torch.testing.assert_close(call["loss_fn"](some_cos), expected_inner, rtol=1e-4, atol=1e-6)

    loss.backward()
    got = [prm.grad.clone() for prm in model.parameters()]
    model.zero_grad(set_to_none=True)
    cos, cos_adv = model(x), model(x_fixed)
    gain = torch.where(F.one_hot(y, 4).bool(), 1 - cos + BETA, cos + BETA)
    acc = F.cross_entropy(S * gain * cos, y)
    p, q = F.softmax(S * cos, dim=1), F.softmax(S * cos_adv, dim=1)
    terms = p * torch.log(p / q)
    expected = acc + LAM * (ALPHA * terms.sum(1) + (terms ** 2).sum(1)).mean()
    assert terms.sum(1).mean() > 0.5  # the robustness term matters
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-3, atol=1e-6)
    model.zero_grad(set_to_none=True)


def test_inner_maximization_raises_the_robustness_loss(cosine_model, synthetic, make_ctx):
    model = cosine_model
    x, y = synthetic.train_x[:B], synthetic.train_y[:B]
    inputs = []
    handle = model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    torch.manual_seed(0)
    DEFENSES.get("spat")().training_step(model, x, y, make_ctx(model, eps=0.1))
    handle.remove()
    start, x_adv = inputs[1], inputs[-1]
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    model.eval()
    with torch.no_grad():
        p_log = F.log_softmax(S * model(x), dim=1)
        at_start = robustness_loss(p_log, S * model(start), ALPHA).mean()
        at_end = robustness_loss(p_log, S * model(x_adv), ALPHA).mean()
    model.train()
    assert at_end > 0.05 and at_end > 100 * at_start


def test_paper_defaults():
    c = DEFENSES.get("spat")().config
    assert (c.s, c.lam, c.alpha, c.beta, c.steps, c.step_ratio, c.init_std) == (5.0, 6.0, 0.2, 0.2, 10, 0.25, 0.001)
