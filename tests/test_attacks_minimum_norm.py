"""Minimum-norm attacks: RayS (hard-label L∞), C&W-L2, DeepFool. Exact distances on a linear
classifier (where the smallest perturbation has a closed form), RayS's budget, determinism and
cross-check against white-box attacks, C&W's binary search, agreement with torchattacks, and the
evaluation harness reading their per-sample distances."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from attacks.rays import BINARY_TOL
from bench.core.attack import ATTACKS
from bench.core.errors import BenchError
from bench.engine.counting import count_passes
from bench.engine.evaluation import perturbation_norms, run_attack


def fooled(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def robust_at(model, x, y, x_adv, norm, eps) -> torch.Tensor:
    """As the harness counts a minimum-norm result: correct, or adversarial farther than eps."""
    return ~fooled(model, x_adv, y) | (perturbation_norms(x_adv, x, norm) > eps + 1e-5)


class Linear2(nn.Module):
    """z = W·x + b with two classes on 1x8x8 inputs. With f = z_1 − z_0 and w = W_1 − W_0, the
    smallest perturbation that flips the decision has L2 norm |f|/‖w‖₂ (along w) and L∞ norm
    |f|/‖w‖₁ (along sign(w)), as long as the box [0, 1] does not bind."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(2, 64, generator=g))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x.flatten(1) @ self.weight.t() + self.bias


@pytest.fixture(scope="module")
def linear():
    """The linear model, 32 inputs near 0.5 labelled by the model, and their exact L2 and L∞
    boundary distances (0.18-0.24 and 0.027-0.037: the box never binds)."""
    model = Linear2().eval()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.02 * torch.randn(32, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        w = model.weight[1] - model.weight[0]
        f = (model(x)[:, 1] - model(x)[:, 0]).abs()
    return model, x, y, {"L2": f / w.norm(), "Linf": f / w.abs().sum()}


# --------------------------------------------------------------------------- exact on a linear model


@pytest.mark.parametrize("norm", ["L2", "Linf"])
def test_deepfool_is_exact_on_a_linear_classifier(norm, linear):
    """One linearization is exact: DeepFool lands at (1 + overshoot)·(d + 1e-4) in one step, which
    costs two forward passes (x, then the iterate) and one backward pass (C − 1 = 1 class)."""
    model, x, y, distance = linear
    attack = ATTACKS.get("deepfool")(norm=norm)
    with count_passes(model) as c:
        x_adv = attack(model, x, y)
    assert fooled(model, x_adv, y).all()
    torch.testing.assert_close(perturbation_norms(x_adv, x, norm), 1.02 * (distance[norm] + 1e-4), rtol=1e-5, atol=0)
    assert (c.forward, c.backward) == (2 * len(x), len(x))


def test_cw_l2_converges_to_the_minimal_distance(linear):
    """C&W-L2 (100 iterations x 5 binary steps) ends within 2% of the exact L2 distance (measured:
    0.03-1.1% above it; with 1,000 x 9, 0.007-0.26%); no adversarial point can lie below it."""
    model, x, y, distance = linear
    x_adv = ATTACKS.get("cw_l2")(steps=100, binary_steps=5)(model, x, y)
    assert fooled(model, x_adv, y).all()
    ratio = perturbation_norms(x_adv, x, "L2") / distance["L2"]
    assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.02


def test_rays_finds_the_nearest_vertex_ray_on_a_linear_classifier(linear):
    """For a linear model the best ray is the sign vector of ±w, and RayS's hierarchy of block flips
    reaches it (a flip of one coordinate helps iff its sign is wrong): the distance found is the
    exact L∞ distance up to the bisection tolerance 1e-3/√64. Labels only: no backward pass."""
    model, x, y, distance = linear
    attack = ATTACKS.get("rays")(queries=1000)
    with count_passes(model) as c:
        x_adv = attack(model, x, y)
    assert fooled(model, x_adv, y).all()
    gap = perturbation_norms(x_adv, x, "Linf") - distance["Linf"]
    assert gap.min() >= -1e-6 and gap.max() <= BINARY_TOL / math.sqrt(64)
    assert c.backward == 0 and c.forward <= 1000 * len(x)


# --------------------------------------------------------------------------- RayS


def test_rays_spends_exactly_its_budget_without_gradients(trained_model, synthetic):
    """The full search spends the whole budget on every correctly classified sample and one query
    on a misclassified one (distance 0, returned as x); it never calls backward and leaves no
    gradient on the model. `stats` counts the queries the harness counts as forward passes."""
    x, y = synthetic.test_x[64:], synthetic.test_y[64:]
    clean = ~fooled(trained_model, x, y)
    assert not clean.all()  # one misclassified sample among these 64
    attack = ATTACKS.get("rays")(queries=150)
    with count_passes(trained_model) as c:
        x_adv = attack(trained_model, x, y)
    assert c.backward == 0 and all(p.grad is None for p in trained_model.parameters())
    assert c.forward == attack.stats["queries"] == 150 * int(clean.sum()) + int((~clean).sum())
    assert torch.equal(x_adv[~clean], x[~clean])


def test_rays_results_do_not_depend_on_the_batch(trained_model, synthetic):
    """Each sample follows its own query sequence (no randomness, no shared state), so attacking
    64 samples at once or as two batches of 32 gives identical points; `stats` accumulates."""
    x, y = synthetic.test_x[:64], synthetic.test_y[:64]
    whole = ATTACKS.get("rays")(queries=200)(trained_model, x, y)
    attack = ATTACKS.get("rays")(queries=200)
    halves = torch.cat([attack(trained_model, x[:32], y[:32]), attack(trained_model, x[32:], y[32:])])
    assert torch.equal(whole, halves)
    assert attack.stats["samples"] == 64 and attack.stats["found"] == 64


def test_rays_early_stop_gives_the_same_robust_accuracy_for_fewer_queries(trained_model, synthetic):
    """A sample stops once its distance is <= eps. Its query sequence up to then is the full
    search's, so the samples robust at eps are exactly the same; the fooled ones end at or below
    eps, and the budget spent drops (measured 298 -> 182 queries per sample at eps 0.1)."""
    x, y = synthetic.test_x, synthetic.test_y
    full = ATTACKS.get("rays")(eps=0.1, queries=300)
    early = ATTACKS.get("rays")(eps=0.1, queries=300, early_stop=True)
    x_full, x_early = full(trained_model, x, y), early(trained_model, x, y)
    assert torch.equal(robust_at(trained_model, x, y, x_full, "Linf", 0.1),
                       robust_at(trained_model, x, y, x_early, "Linf", 0.1))
    assert early.stats["mean_queries"] < 0.7 * full.stats["mean_queries"]
    assert "adbd" in full.stats and "adbd" not in early.stats


class AlwaysZero(nn.Module):
    """Predicts class 0 everywhere: class-0 samples are never fooled, the others are misclassified at x."""

    def forward(self, x):
        return torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(len(x), 4)


def test_rays_adbd_counts_never_fooled_samples_at_their_clipped_distance(trained_model, synthetic):
    """ADBD as the official code reports it: the mean over all samples, one never fooled within the
    budget at ‖clip(x + ∞·1) − x‖∞ = max(1 − x) (its search's start), a misclassified one at 0;
    `adbd_found` averages the fooled ones only. On the trained model every boundary is found and the
    two agree with the returned points."""
    x, y = synthetic.test_x[:64], synthetic.test_y[:64]
    attack = ATTACKS.get("rays")(queries=20)
    attack(AlwaysZero(), x, y)
    never = y == 0
    assert 0 < int(never.sum()) == len(x) - attack.stats["found"]
    clipped = (1 - x).flatten(1).amax(1)
    assert attack.stats["adbd"] == pytest.approx((clipped * never).sum().item() / len(x), rel=1e-5)
    assert attack.stats["adbd_found"] == 0.0 and attack.stats["adbd"] > 0.1

    attack = ATTACKS.get("rays")(queries=20)
    x_adv = attack(trained_model, x, y)
    assert attack.stats["found"] == len(x)
    dist = (x_adv - x).flatten(1).abs().amax(1)
    assert attack.stats["adbd"] == attack.stats["adbd_found"] == pytest.approx(dist.mean().item(), rel=1e-5)


class Quantized(nn.Module):
    """`model` behind input quantization to 1/16: gradients through round() are zero (masked),
    decisions are not."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 16) / 16)


def white_box_accuracy(model, x, y, eps) -> float:
    """Per-sample AND of PGD-20, CW∞ and MultiTargeted (20 steps)."""
    ok = torch.ones(len(x), dtype=torch.bool)
    for name, params in [("pgd", {}), ("cw_linf", {}), ("multi_targeted", {"steps": 20})]:
        torch.manual_seed(0)
        ok &= ~fooled(model, ATTACKS.get(name)(eps=eps, **params)(model, x, y), y)
    return ok.float().mean().item()


def test_rays_cross_check_against_white_box_attacks(trained_model, synthetic):
    """RayS is no stronger than the white-box worst case on an honest model, and much stronger on
    one whose gradients are masked: the sanity check "white-box >= black-box" separates the two.

    Trained model (RayS with 1,000 queries, converged in these 64 dimensions; white-box seeds 0-2):
    eps 0.1: RayS 33.6%, white-box 32.0-32.8%; eps 0.15: RayS 3.9%, white-box 2.3-4.7%. With ~16
    queries per dimension RayS is nearly exhaustive, so it finds up to 4 of 128 samples the 20-step
    white-box attacks miss: the bound allows 2% (2.5 samples) below. Quantized model (zero input
    gradients), eps 0.1: white-box 98.4% (it barely moves), RayS 35.9%."""
    x, y = synthetic.test_x, synthetic.test_y
    x_adv = ATTACKS.get("rays")(queries=1000)(trained_model, x, y)
    for eps in (0.1, 0.15):
        rays = robust_at(trained_model, x, y, x_adv, "Linf", eps).float().mean().item()
        assert rays >= white_box_accuracy(trained_model, x, y, eps) - 0.02, eps
    masked = Quantized(trained_model).eval()
    rays = robust_at(masked, x, y, ATTACKS.get("rays")(queries=500)(masked, x, y), "Linf", 0.1).float().mean().item()
    assert rays < white_box_accuracy(masked, x, y, 0.1) - 0.3


# --------------------------------------------------------------------------- through the harness


@pytest.mark.parametrize("name, params", [
    ("rays", {"queries": 200}), ("cw_l2", {"steps": 50, "binary_steps": 3}),  # cw_l2: 50 of 64 found
    ("deepfool", {"norm": "L2", "steps": 2}), ("deepfool", {"norm": "Linf", "eps": 0.1}),  # 2 steps: 24 of 64
])
def test_harness_reads_minimum_norm_results(name, params, trained_model, synthetic):
    """`run_attack` stores a distance exactly where the returned point is adversarial (NaN where
    the attack found nothing), counts robust exactly the samples that are correct or farther than
    eps, and sees no silent success (the attacks observe only iterates inside the ball, and return
    the smallest adversarial point, so any fooling iterate inside is also a fooling result)."""
    x, y = synthetic.test_x[:64], synthetic.test_y[:64]
    attack = ATTACKS.get(name)(**params)
    torch.manual_seed(0)
    result = run_attack(trained_model, attack, x, y, batch_size=32)
    torch.manual_seed(0)
    again = ATTACKS.get(name)(**params)  # deterministic: the same points, batch by batch
    x_adv = torch.cat([again(trained_model, x[i:i + 32], y[i:i + 32]) for i in (0, 32)])
    adversarial = fooled(trained_model, x_adv, y)
    assert torch.equal(result.norms.isnan(), ~adversarial)
    norm, eps = attack.config.norm, attack.config.eps
    assert torch.equal(result.correct, robust_at(trained_model, x, y, x_adv, norm, eps))
    assert not result.silent_success.any()
    if name == "rays":  # every boundary found here: both ADBDs are the mean distance the harness stores
        assert attack.stats["found"] == len(x)
        assert attack.stats["adbd"] == attack.stats["adbd_found"] == pytest.approx(result.norms.mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- C&W-L2


@pytest.fixture(scope="module")
def cw_quick(trained_model, synthetic):
    """C&W-L2 with 100 iterations x 5 binary steps on the 128 test images (deterministic)."""
    return ATTACKS.get("cw_l2")(steps=100, binary_steps=5)(trained_model, synthetic.test_x, synthetic.test_y)


def test_cw_l2_early_abort_is_decided_per_sample(trained_model, synthetic):
    """Each sample stops on its own loss, as the reference code with its batch of one: attacking 8
    samples together or one at a time gives the same points and the same number of forward passes
    per sample, and the samples stop at different iterations (so a batch-wide decision would differ)."""
    x, y = synthetic.test_x[:8], synthetic.test_y[:8]
    attack = ATTACKS.get("cw_l2")(steps=100, binary_steps=3)
    with count_passes(trained_model) as together:
        x_together = attack(trained_model, x, y)
    alone, x_alone = [], []
    for i in range(len(x)):
        with count_passes(trained_model) as c:
            x_alone.append(attack(trained_model, x[i:i + 1], y[i:i + 1]))
        alone.append(c.forward)
    torch.testing.assert_close(torch.cat(x_alone), x_together, rtol=0, atol=1e-4)
    assert together.forward == sum(alone)
    assert min(alone) < max(alone) < 3 * 100


@pytest.mark.slow
def test_cw_l2_defaults_fool_every_sample(trained_model, synthetic):
    """The paper's defaults (9 binary steps x 10,000 iterations, abort early) fool all 127 correctly
    classified test images (median L2 0.504; ~22,000 iterations per sample, 5 min on a busy CPU)."""
    x, y = synthetic.test_x, synthetic.test_y
    clean = ~fooled(trained_model, x, y)
    x_adv = ATTACKS.get("cw_l2")()(trained_model, x, y)
    assert fooled(trained_model, x_adv, y)[clean].all()


def test_cw_l2_succeeds_where_torchattacks_defaults_do_not(trained_model, synthetic, cw_quick):
    """Even at 100 iterations x 5 binary steps the binary search over c fools every correctly
    classified image (median L2 0.56); torchattacks 3.5.1's `CW` defaults (c = 1, 50 steps, no
    search) fool 110 of 127 (87%): 50 steps of lr 0.01 are too few (500 steps: 126; c = 10 or 100
    at 50 steps: 115-116), and without the search over c its distances are not minimal (median
    0.66, against 0.50 for the defaults of `cw_l2`, see test_cw_l2_defaults_fool_every_sample)."""
    import torchattacks

    x, y = synthetic.test_x, synthetic.test_y
    clean = ~fooled(trained_model, x, y)
    assert fooled(trained_model, cw_quick, y)[clean].all()
    model = copy.deepcopy(trained_model)  # torchattacks leaves gradients on the model's parameters
    theirs = torchattacks.CW(model)
    theirs.set_model_training_mode(model_training=False)
    assert fooled(model, theirs(x, y), y)[clean].float().mean() <= 0.95


def test_cw_l2_more_binary_steps_only_improve(trained_model, synthetic, cw_quick):
    """The attack is deterministic and keeps the smallest adversarial point over all binary steps,
    so 5 steps repeat the first 3 and can only add successes and shorten distances (measured: 3
    steps fool 100 of 127 correct samples, 5 steps all; the common ones get 0.6% shorter on median)."""
    x, y = synthetic.test_x, synthetic.test_y
    three, five = ATTACKS.get("cw_l2")(steps=100, binary_steps=3)(trained_model, x, y), cw_quick
    f3, f5 = fooled(trained_model, three, y), fooled(trained_model, five, y)
    assert (f5 | ~f3).all() and f5.sum() > f3.sum()
    d3, d5 = perturbation_norms(three, x, "L2"), perturbation_norms(five, x, "L2")
    assert (d5[f3] <= d3[f3] + 1e-6).all() and (d5[f3] < d3[f3] - 1e-4).any()


def test_cw_l2_costs_one_forward_and_backward_per_iteration(trained_model, synthetic):
    x, y = synthetic.test_x[:16], synthetic.test_y[:16]
    with count_passes(trained_model) as c:
        ATTACKS.get("cw_l2")(steps=7, binary_steps=3, abort_early=False)(trained_model, x, y)
    assert (c.forward, c.backward) == (21 * 16, 21 * 16)
    assert all(p.grad is None for p in trained_model.parameters())


# --------------------------------------------------------------------------- DeepFool


def test_deepfool_agrees_with_torchattacks(trained_model, synthetic):
    """On the images both fool, our L2 distances are torchattacks 3.5.1's DeepFool's to within 1%
    (measured: median +0.02%, max +0.73%; ours add the official code's 1e-4 to each step).
    Ours fools every correctly classified image of the test set; torchattacks fools about two
    thirds of them (it clips every iterate and applies the overshoot per step): 93 of 127 where
    this was written, 84 of 126 and 86 of 127 on the trained models that AVX-512 and AVX2 kernels
    make (of the first 64 images, only 39-51), so the whole test set is compared."""
    import torchattacks

    x, y = synthetic.test_x, synthetic.test_y
    clean = ~fooled(trained_model, x, y)
    ours = ATTACKS.get("deepfool")()(trained_model, x, y)
    model = copy.deepcopy(trained_model)
    atk = torchattacks.DeepFool(model)
    atk.set_model_training_mode(model_training=False)
    theirs = atk(x, y)
    both = clean & fooled(trained_model, ours, y) & fooled(trained_model, theirs, y)
    assert fooled(trained_model, ours, y)[clean].all() and both.sum() >= 64
    ratio = perturbation_norms(ours, x, "L2")[both] / perturbation_norms(theirs, x, "L2")[both]
    assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 1.01


# --------------------------------------------------------------------------- configuration


def test_minimum_norm_defaults_are_the_papers():
    rays, cw, df = ATTACKS.get("rays")(), ATTACKS.get("cw_l2")(), ATTACKS.get("deepfool")()
    assert (rays.config.queries, rays.config.early_stop, rays.kind, rays.minimum_norm) == (40000, False, "decision", True)
    assert (cw.config.steps, cw.config.binary_steps, cw.config.lr, cw.config.initial_const, cw.config.confidence,
            cw.config.abort_early) == (10000, 9, 0.01, 1e-3, 0.0, True)
    assert (df.config.steps, df.config.overshoot, df.config.candidates) == (50, 0.02, 10)
    assert cw.minimum_norm and df.minimum_norm


@pytest.mark.parametrize("name, params, message", [
    ("rays", dict(norm="L2", eps=0.5), "supports Linf only"), ("rays", dict(queries=0), "queries"),
    ("cw_l2", dict(norm="Linf", eps=0.03), "cw_linf"), ("cw_l2", dict(steps=0), "steps"),
    ("cw_l2", dict(lr=-0.01), "lr"), ("cw_l2", dict(initial_const=0.0), "initial_const"),
    ("cw_l2", dict(confidence=-1.0), "confidence"),
    ("deepfool", dict(steps=0), "steps"), ("deepfool", dict(candidates=1), "candidates"),
    ("deepfool", dict(overshoot=-0.1), "overshoot"),
])
def test_bad_parameters_are_refused(name, params, message):
    with pytest.raises(BenchError, match=message):
        ATTACKS.get(name)(**params)
