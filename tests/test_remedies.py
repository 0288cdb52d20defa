"""Remedies: the registry's contract, each view and measurement on hand-made models, and the
randomness check that several passes make reliable. The end-to-end proof (every planted failure
flagged, remedied, its adaptive worst case near the base model's) is in test_adaptive.py."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.check import CHECKS, CheckContext, CheckResult
from bench.core.errors import BenchError
from bench.core.models import Preprocessing
from bench.core.planted import BatchRandom, JpegCompression, NoisyInput, Partial, Shattered
from bench.core.remedy import LOGIT_STD_CAP, REMEDIES, AdaptiveAttack, RemedyContext, recover_logits
from bench.core.threat import ThreatModel
from bench.engine.adaptive import AdaptiveSettings, adaptive_settings, calls_for
from bench.remedies.bpda import OperatorStraightThrough, StraightThrough
from bench.remedies.eot import draws_needed
from bench.remedies.surrogate import Hybrid


def context(model, x, y, synthetic, flags=None) -> RemedyContext:
    return RemedyContext(model, x, y, synthetic, ThreatModel("Linf", 0.1), torch.device("cpu"), 0, flags or {})


def input_grad(loss, x: torch.Tensor, allow_unused: bool = False) -> torch.Tensor | None:
    """d loss(x) / dx, leaving every model's parameters without gradients (None: x is not used)."""
    z = x.clone().requires_grad_(True)
    out = loss(z)
    if not out.requires_grad:
        return None
    return torch.autograd.grad(out, z, allow_unused=allow_unused)[0]


def centred(z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(1, keepdim=True)


# --------------------------------------------------------------------------- the registry's contract

def test_every_remedy_names_real_checks_a_paper_and_valid_defaults():
    assert REMEDIES.names() == ["bpda_ops", "bpda_secant", "bpda_ste", "bpda_surrogate", "eot", "logit_recovery", "rays",
                                "square", "transfer_surrogate"]
    orders = [REMEDIES.get(n).order for n in REMEDIES.names()]
    assert len(set(orders)) == len(orders)  # the escalation order is total
    for name in REMEDIES.names():
        cls = REMEDIES.get(name)
        assert cls.answers and set(cls.answers) <= set(CHECKS.names()), name
        assert cls.title and cls.paper and inspect.getdoc(cls), name
        cls()  # the defaults validate


def test_each_flag_of_a_model_failure_has_a_remedy():
    """The checks that flag obfuscation are each answered by at least one remedy; the checks of
    training (FGSM's loss gap), of the curves' shape and of the attacks' own bugs are not."""
    answered = {c for n in REMEDIES.names() for c in REMEDIES.get(n).answers}
    assert {"logits_not_probabilities", "deterministic_outputs", "gradients_nonzero", "white_box_beats_black_box",
            "unbounded_attack_succeeds"} <= answered
    assert not answered & {"fgsm_pgd_loss_gap", "silent_success", "steps_converged"}


def test_bad_remedy_settings_are_one_line_errors():
    with pytest.raises(BenchError, match="unknown remedy 'eto'.*Did you mean 'eot'"):
        AdaptiveSettings(remedies={"eto": {}})
    with pytest.raises(BenchError, match="unknown parameter 'k' for remedy 'eot'"):
        AdaptiveSettings(remedies={"eot": {"k": 3}})
    with pytest.raises(BenchError, match="draws must be >= 2"):
        AdaptiveSettings(remedies={"eot": {"draws": 1}})
    with pytest.raises(BenchError, match="'warned' must be true or false"):
        adaptive_settings({"warned": "yes"}, "suite")
    assert adaptive_settings({"warned": True, "square": {"queries": 50}}, "suite") == \
        AdaptiveSettings(True, {"square": {"queries": 50}})


def test_failed_checks_call_for_remedies_and_warned_ones_when_asked():
    flags = {name: CheckResult(status, 0.0, 0.0, "") for name, status in
             (("gradients_nonzero", "fail"), ("large_eps_accuracy", "warn"), ("deterministic_outputs", "fail"),
              ("monotone_in_eps", "pass"), ("silent_success", "not-run"))}
    assert calls_for(flags, AdaptiveSettings()) == ["deterministic_outputs", "gradients_nonzero"]
    assert calls_for(flags, AdaptiveSettings(warned=True)) == ["deterministic_outputs", "gradients_nonzero",
                                                                "large_eps_accuracy"]


# --------------------------------------------------------------------------- views

def test_recovered_logits_undo_softmax_and_scale_and_keep_the_prediction():
    z = torch.randn(16, 10) * 3
    assert torch.equal(recover_logits(z), z)  # ordinary logits: the model's own cross-entropy
    for out in (z, torch.softmax(z, 1), 1e4 * z):
        r = recover_logits(out)
        assert torch.equal(r.argmax(1), z.argmax(1))
        assert (r.std(1) <= LOGIT_STD_CAP + 1e-4).all()
    assert torch.allclose(recover_logits(1e4 * z).std(1), torch.full((16,), LOGIT_STD_CAP), atol=1e-4)
    # a softmax's log is the logits up to a per-sample shift (while no probability underflows)
    assert torch.allclose(centred(recover_logits(torch.softmax(z, 1))), centred(z), atol=1e-4)
    # a scale that saturates the cross-entropy's gradient in float32 no longer does
    w = z.clone().requires_grad_(True)
    saturated, = torch.autograd.grad(F.cross_entropy(1e4 * w, z.argmax(1)), w)
    w = z.clone().requires_grad_(True)
    recovered, = torch.autograd.grad(F.cross_entropy(recover_logits(1e4 * w), z.argmax(1)), w)
    assert saturated.abs().max() == 0 and recovered.abs().max() > 0


def test_straight_through_differentiates_the_declared_preprocessing_as_the_identity(trained_model, batch):
    """Through a JPEG-compressing model the input gradient is zero; through its straight-through
    view it is the inner model's gradient at the compressed point (Athalye et al.'s BPDA)."""
    x, y = batch
    jpeg = JpegCompression()
    model = nn.Sequential(jpeg, trained_model)
    assert input_grad(lambda z: F.cross_entropy(model(z), y), x).abs().max() == 0
    through = input_grad(lambda z: F.cross_entropy(StraightThrough(model)(z), y, reduction="sum"), x)
    inner = input_grad(lambda w: F.cross_entropy(recover_logits(trained_model(w)), y, reduction="sum"), jpeg(x))
    assert torch.allclose(through, inner, atol=1e-6) and through.abs().max() > 0
    assert isinstance(jpeg, Preprocessing)


def test_operator_bpda_goes_straight_through_rounding_and_gradient_cuts(trained_model, batch):
    """Quantization (`round`) and a gradient cut (`detach`) inside a model: no gradient; through
    the operator view, the inner model's gradient (at the quantized point for `round`)."""
    x, y = batch

    class Cut(nn.Module):
        def forward(self, z):
            return trained_model(z).detach()

    class Rounded(nn.Module):
        def forward(self, z):
            return trained_model(torch.round(z * 4) / 4)

    for model, at in ((Cut(), x), (Rounded(), torch.round(x * 4) / 4)):
        assert input_grad(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x, allow_unused=True) is None \
            or input_grad(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x).abs().max() == 0
        through = input_grad(lambda z: F.cross_entropy(OperatorStraightThrough(model)(z), y, reduction="sum"), x)
        inner = input_grad(lambda z: F.cross_entropy(recover_logits(trained_model(z)), y, reduction="sum"), at)
        assert torch.allclose(through, inner, atol=1e-6) and through.abs().max() > 0
    ops = REMEDIES.get("bpda_ops")()
    assert ops.applies(context(Rounded(), x, y, None)) is None and ops.applies(context(Cut(), x, y, None)) is None
    assert ops.applies(context(trained_model, x, y, None)) is not None


def test_hybrid_forward_is_the_model_backward_is_the_surrogate(trained_model, tiny_model, batch):
    """The forward pass: the model's recovered logits (here of softmax outputs: its logits up to a
    per-sample shift); the backward pass: the surrogate's gradient."""
    x, _ = batch
    model = tiny_model.eval()  # untrained: small logits, no probability underflows
    hybrid = Hybrid(nn.Sequential(model, nn.Softmax(1)), trained_model)
    with torch.no_grad():
        assert torch.allclose(centred(hybrid(x)), centred(recover_logits(model(x))), atol=1e-4)
    assert torch.allclose(input_grad(lambda z: hybrid(z).sum(), x), input_grad(lambda z: trained_model(z).sum(), x))


def test_draws_needed_follows_the_variance_of_the_gradient():
    """Gradients g = μ + σ·ε (d = 100): tr Σ = 100σ², ‖μ‖² = 100, so k = ⌈σ² / 0.1⌉ at
    rel_variance 0.1: 1 for σ = 0.1, 10 for σ = 1, 40 for σ = 2 (measured from 400 draws, to 10%)."""
    torch.manual_seed(0)
    for sigma, k in ((0.1, 1), (1.0, 10), (2.0, 40)):
        grads = 1.0 + sigma * torch.randn(400, 8, 100)
        got = draws_needed(grads, 0.1)
        assert ((got - k).abs() <= max(1, 0.1 * k)).all(), (sigma, got)
    assert torch.isinf(draws_needed(torch.randn(50, 4, 100), 0.1)).all()  # no signal: no k is enough


def test_adaptive_attack_runs_on_the_view_and_keeps_its_identity(trained_model, batch, synthetic):
    """An adaptive attack's parameters hold the remedy's (and its revision is in the implementation):
    the same attack run by two remedies are two evaluations."""
    x, y = batch
    model = nn.Sequential(trained_model, nn.Softmax(1))
    ctx = context(model, x, y, synthetic)
    remedy = REMEDIES.get("logit_recovery")(steps=10, n_target_classes=3)
    label, attack = remedy.attacks(ctx)[0]
    adaptive = AdaptiveAttack(remedy, ctx, attack)
    assert adaptive.params()["remedy"] == "logit_recovery" and adaptive.params()["attack"] == attack.params()
    assert adaptive.implementation_id.endswith(f"remedy logit_recovery r{remedy.revision}")
    torch.manual_seed(0)
    x_adv = adaptive(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).float().mean() < (model(x).argmax(1) == y).float().mean()


def test_applicability_follows_the_model(trained_model, batch, synthetic):
    x, y = batch
    logit = REMEDIES.get("logit_recovery")()
    assert logit.applies(context(nn.Sequential(trained_model, nn.Softmax(1)), x, y, synthetic)) is None
    assert "restores a gradient on 0.0%" in logit.applies(context(trained_model, x, y, synthetic))
    eot = REMEDIES.get("eot")()
    flags = {"deterministic_outputs": CheckResult("fail", 1.0, 1e-5, "")}
    assert eot.applies(context(trained_model, x, y, synthetic, flags)) is None
    assert eot.applies(context(trained_model, x, y, synthetic)) == "the model's outputs are deterministic"
    ste = REMEDIES.get("bpda_ste")()
    assert ste.applies(context(nn.Sequential(JpegCompression(), trained_model), x, y, synthetic)) is None
    assert ste.applies(context(trained_model, x, y, synthetic)) is not None


# --------------------------------------------------------------------------- plants on hand-made models

def test_secant_bpda_finds_the_shattering_activations_and_restores_the_gradient(trained_model, batch, synthetic):
    """On `shattered` (every ReLU oscillating), the probe finds exactly the six activations (the
    normalization and the honest model's ReLUs are elementwise too, with derivatives that follow
    their slopes); through their secant slopes the input gradient is again the honest model's
    (cosine > 0.9 for most samples), while the shattered model's own gradient is not."""
    x, y = batch
    shattered = Shattered(copy.deepcopy(trained_model))
    secant = REMEDIES.get("bpda_secant")()
    assert "no elementwise layer's derivative departs" in secant.applies(context(trained_model, x, y, synthetic))
    ctx = context(shattered, x, y, synthetic)
    assert secant.applies(ctx) is None
    found = secant.layers(ctx)
    assert len(found) == 6 and all(type(layer.module).__name__ == "ShatteredReLU" for layer in found)
    honest = input_grad(lambda z: F.cross_entropy(recover_logits(trained_model(z)), y, reduction="sum"), x).flatten(1)
    through = input_grad(lambda z: F.cross_entropy(secant.view(shattered, ctx)(z), y, reduction="sum"), x).flatten(1)
    raw = input_grad(lambda z: F.cross_entropy(recover_logits(shattered(z)), y, reduction="sum"), x).flatten(1)
    assert F.cosine_similarity(through, honest, dim=1).median() > 0.9
    assert F.cosine_similarity(raw, honest, dim=1).abs().median() < 0.3
    with torch.no_grad():  # the forward pass is the shattered model's own
        assert torch.equal(secant.view(shattered, ctx)(x), recover_logits(shattered(x)))


def test_function_preserving_plants_keep_the_predictions(trained_model, batch):
    """`shattered` and `partial` change the gradient, not the function (up to the shattered
    activations' amplitude): the predictions are the inner model's."""
    x, _ = batch
    inner = copy.deepcopy(trained_model[1])
    with torch.no_grad():
        z = trained_model[0](x)
        expected = inner(z).argmax(1)
        assert torch.equal(Partial(copy.deepcopy(inner))(z).argmax(1), expected)
        assert (Shattered(copy.deepcopy(inner))(z).argmax(1) == expected).float().mean() >= 0.95


def test_shattered_gradients_are_nonzero_and_point_nowhere(trained_model, batch):
    x, y = batch
    inner = trained_model[1]
    z = trained_model[0](x).detach()
    grads = [input_grad(lambda w: F.cross_entropy(net(w), y, reduction="sum"), z).flatten(1)
             for net in (inner, Shattered(copy.deepcopy(inner)))]
    cos = F.cosine_similarity(grads[0], grads[1], dim=1)
    assert (grads[1].abs().amax(1) > 0).all() and cos.abs().median() < 0.2


# --------------------------------------------------------------------------- the randomness check

def _check_determinism(model, x):
    ctx = CheckContext(model, x, None, ThreatModel("Linf", 0.1), 4, 1.0)
    return CHECKS.get("deterministic_outputs")().run(ctx)


def test_determinism_check_catches_randomness_drawn_once_per_batch(trained_model, batch):
    """`batch_random` adds noise on one forward pass in three, to the whole batch: two passes agree
    (both without noise) with probability 4/9 (measured over 400 pairs: within 0.37-0.52, 3
    standard deviations), while the check's 30 calls miss it with probability (2/3)^30 ≈ 5e-6
    (none of 60 seeds). Honest and per-sample random models: pass and fail."""
    x, _ = batch
    model = BatchRandom(trained_model)
    torch.manual_seed(0)
    with torch.no_grad():
        agree = sum(torch.equal(model(x), model(x)) for _ in range(400)) / 400
    assert 0.37 < agree < 0.52
    for seed in range(60):
        torch.manual_seed(seed)
        assert _check_determinism(model, x).status == "fail", seed
    assert _check_determinism(trained_model, x).status == "pass"
    result = _check_determinism(NoisyInput(trained_model), x)
    assert result.status == "fail" and result.evidence["samples_changed"] == 1.0
    assert result.evidence["calls"] == 30
