"""AutoAttack against Croce & Hein's own code (the `pyautoattack` package): each component and the
standard cascade, ours vs official, per sample, at Linf and L2, on a 10-class model (digits) where
the attacks fool part of the samples; the official path's construction (the APGD step-size schedule
of `apgd_steps`), its identity and its errors.

Same seed on both sides: the official components re-seed the global RNG with their `seed` before
their first draw, ours draw from the global RNG as seeded, so both start from the same points.
"""

from __future__ import annotations

import sys

import pyautoattack
import pytest
import torch
import torch.nn.functional as F
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from attacks.apgd import checkpoints
from bench.core.attack import ATTACKS
from bench.core.data import load_dataset
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.core.threat import BALL_TOLERANCE, perturbation_norms

THREATS = [("Linf", 0.05), ("L2", 0.5)]
SEED = 0
MARGIN = 1e-3  # logit margin below which CPU rounding may decide a sample (logits here are ~10-30)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def model(digits):
    """A small_cnn (width 8) after 40 full-batch Adam steps (lr 1e-2) on the digits training split:
    ~88% accurate on the first 64 test images; eval mode, parameters frozen."""
    torch.manual_seed(0)
    net = build_model("small_cnn", num_classes=10, input_shape=digits.input_shape, mean=digits.mean, std=digits.std,
                      width=8, hidden=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(net(digits.train_x), digits.train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def robust(model, x_adv, x, y, norm, eps) -> torch.Tensor:
    """Per sample: no misclassified point within eps was returned."""
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != y
    return ~(wrong & (perturbation_norms(x_adv, x, norm) <= eps + BALL_TOLERANCE))


def margin(model, x, y) -> torch.Tensor:
    """z_y − max_{k≠y} z_k per sample."""
    with torch.no_grad():
        z = model(x)
    other = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return z.gather(1, y[:, None]).squeeze(1) - other


def assert_same_samples(model, x, y, ours, theirs, norm, eps) -> torch.Tensor:
    """The same samples are robust on both sides. A sample may differ only where the fooling point
    sits on the decision boundary to rounding (|margin| < MARGIN): there the CPU kernels' summation
    order decides, not the algorithm. Returns the official robust mask."""
    ours_ok, theirs_ok = robust(model, ours, x, y, norm, eps), robust(model, theirs, x, y, norm, eps)
    differ = (ours_ok != theirs_ok).nonzero().flatten()
    for i in differ.tolist():
        point = theirs[i:i + 1] if ours_ok[i] else ours[i:i + 1]
        assert margin(model, point, y[i:i + 1]).abs().item() < MARGIN, f"sample {i} differs: ours robust {ours_ok[i]}"
    return theirs_ok


def assert_partly_fooled(ok: torch.Tensor, clean_ok: torch.Tensor) -> None:
    """A comparison with something on both sides: at least 5 correct samples fooled and 5 kept."""
    fooled = clean_ok & ~ok
    assert fooled.sum() >= 5 and ok.sum() >= 5, (int(fooled.sum()), int(ok.sum()))


def official_component(label, model, norm, eps, steps, queries):
    """The official attack object of a cascade component, built as `AutoAttack._set_version` does
    for the standard version (except the given budget)."""
    common = dict(norm=norm, eps=eps, seed=SEED, device="cpu")
    if label in ("apgd-ce", "apgd-dlr"):
        return APGDAttack(model, n_iter=steps, n_restarts=1, loss=label[5:], rho=0.75, **common)
    if label == "apgd-t":
        return APGDAttack_targeted(model, n_iter=steps, n_restarts=1, n_target_classes=9, rho=0.75, **common)
    if label == "fab-t":
        return FABAttack_PT(model, n_restarts=1, n_iter=steps, targeted=True, n_target_classes=9, **common)
    return SquareAttack(model, p_init=0.8, n_queries=queries, n_restarts=1, resc_schedule=False, **common)


OURS = {"apgd-ce": ("apgd_ce", {}), "apgd-dlr": ("apgd_dlr", {}), "apgd-t": ("apgd_t", {"n_target_classes": 9}),
        "fab-t": ("fab", {"targeted": True, "n_target_classes": 9}), "square": ("square", {})}


def compare_component(label, model, x, y, norm, eps, steps, queries):
    theirs = official_component(label, model, norm, eps, steps, queries).perturb(x, y)
    name, params = OURS[label]
    budget = {"queries": queries, "rescale_schedule": False} if name == "square" else {"steps": steps}
    torch.manual_seed(SEED)
    ours = ATTACKS.get(name)(norm=norm, eps=eps, **params, **budget)(model, x, y)
    ok = assert_same_samples(model, x, y, ours, theirs, norm, eps)
    assert_partly_fooled(ok, margin(model, x, y) > 0)


@pytest.mark.parametrize("label", list(OURS))
@pytest.mark.parametrize("norm, eps", THREATS)
def test_component_agrees_with_official_per_sample(label, norm, eps, model, digits):
    """APGD-CE, APGD-DLR, APGD-T (9 targets), FAB-T (9 targets), Square at a test budget (10 steps,
    200 queries), 64 digits: the same samples fooled within eps. (Measured at 20 and 100 steps on
    100 samples: the same samples too; APGD and Square points agree to 2e-5, and bit for bit at
    Linf; FAB-T at Linf can land on another point of equal norm, the Linf projection onto a
    hyperplane not being unique, so its points are not compared.)"""
    x, y = digits.test_x[:64], digits.test_y[:64]
    compare_component(label, model, x, y, norm, eps, steps=10, queries=200)


@pytest.mark.parametrize("norm, eps", THREATS)
def test_standard_cascade_agrees_with_official_per_sample(norm, eps, model, digits):
    """`autoattack` with implementation="atbench" and "official", the same seed: the same samples
    end robust; the official run recorded what it was built with, and warned of nothing."""
    x, y = digits.test_x[:64], digits.test_y[:64]
    budget = dict(norm=norm, eps=eps, apgd_steps=10, fab_steps=10, square_queries=200)
    points = {}
    for implementation in ("atbench", "official"):
        attack = ATTACKS.get("autoattack")(implementation=implementation, **budget)
        torch.manual_seed(SEED)
        points[implementation] = attack(model, x, y)
    ok = assert_same_samples(model, x, y, points["atbench"], points["official"], norm, eps)
    assert_partly_fooled(ok, margin(model, x, y) > 0)
    assert list(attack.stats["components"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert "official_warnings" not in attack.stats


@pytest.mark.slow
@pytest.mark.parametrize("norm, eps", THREATS)
def test_full_budget_agrees_with_official_per_sample(norm, eps, model, digits):
    """The paper's budgets (100 APGD and FAB steps, 5,000 Square queries) on 200 digits: each
    component and the standard cascade, the same samples on both sides."""
    x, y = digits.test_x[:200], digits.test_y[:200]
    for label in OURS:
        compare_component(label, model, x, y, norm, eps, steps=100, queries=5000)
    points = {}
    for implementation in ("atbench", "official"):
        torch.manual_seed(SEED)
        points[implementation] = ATTACKS.get("autoattack")(norm=norm, eps=eps, implementation=implementation)(model, x, y)
    assert_same_samples(model, x, y, points["atbench"], points["official"], norm, eps)


def official_schedule(apgd: APGDAttack) -> list[int]:
    """The iterations after which the official APGD may halve its step, from the attributes its
    constructor derives from n_iter (autopgd_base.py: k = n_iter_2, then max(k − size_decr, n_iter_min))."""
    out, k, at = [], apgd.n_iter_2, apgd.n_iter_2
    while at <= apgd.n_iter:
        out.append(at)
        k = max(k - apgd.size_decr, apgd.n_iter_min)
        at += k
    return out


@pytest.mark.parametrize("steps", [10, 20, 100])
def test_official_apgd_is_built_with_the_configured_steps(steps, model):
    """The official APGD objects get `apgd_steps` in their constructor, so their step-size
    checkpoints are those of `apgd_steps` (ours): with 10 or 20 steps, built for 100 and set
    afterwards, the first checkpoint (22) would never come and the step never halve."""
    attack = ATTACKS.get("autoattack")(implementation="official", version="plus", apgd_steps=steps, fab_steps=7,
                                       square_queries=300, eps=0.1)
    plan, _ = attack.plan(10)
    adversary = attack.official_adversary(model, plan, seed=3, device=torch.device("cpu"))
    for apgd in (adversary.apgd, adversary.apgd_targeted):
        assert apgd.n_iter == steps and official_schedule(apgd) == checkpoints(steps)
    assert (adversary.apgd.n_restarts, adversary.apgd_targeted.n_restarts, adversary.apgd_targeted.n_target_classes) == (
        5, 1, 9)
    assert (adversary.fab.n_iter, adversary.fab.n_restarts, adversary.square.n_queries) == (7, 5, 300)
    assert adversary.square.rescale_schedule is False and adversary.apgd.seed == adversary.square.seed == 3
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert official_schedule(APGDAttack(model, n_iter=100, eps=0.1)) == checkpoints(100)


def test_implementation_is_part_of_the_identity():
    ours, official = (ATTACKS.get("autoattack")(implementation=i) for i in ("atbench", "official"))
    assert ours.params()["implementation"] == "atbench" and official.params()["implementation"] == "official"
    assert ours.implementation_id.startswith("atbench r")
    assert official.implementation_id.startswith(f"pyautoattack {pyautoattack.__version__} (official) r")
    with pytest.raises(BenchError, match="implementation 'ours'.*Accepted: atbench, official"):
        ATTACKS.get("autoattack")(implementation="ours")


def test_official_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if it were not installed
    with pytest.raises(BenchError, match="pip install pyautoattack"):
        ATTACKS.get("autoattack")(implementation="official")
    assert ATTACKS.get("autoattack")().implementation == "atbench"
