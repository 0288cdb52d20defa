"""Defenses: one training step of every registered defense (finite scalar loss, gradients, train
mode restored), one mechanism test per defense recomputed independently, and the forward /
backward passes per sample that the trainer's cost accounting reports."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bench.adversary.training
import defenses.mart
import defenses.trades
from bench.core.defense import DEFENSES, Defense
from bench.core.errors import BenchError
from bench.core.schedules import paper_epoch
from bench.core.threat import ThreatModel
from bench.engine.counting import count_passes
from bench.engine.runspec import RunSpec, build_train_config
from bench.engine.trainer import train
from bench.store import Store
from bench.store.schema import Run
from tests.conftest import TINY, tiny_cnn

NAMES = DEFENSES.names()
B = 32


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic.train_x[:B].clone(), synthetic.train_y[:B].clone()



def model_for(name: str, ds) -> nn.Module:
    """A fresh tiny small_cnn with the model parameters the defense needs (MODEL_PARAMS)."""
    return tiny_cnn(ds, **MODEL_PARAMS.get(name, {}))


# The run length of the context the tests below hand a defense: 1 epoch (make_ctx's) unless named
# here. A 1-epoch P-SAT or H-SAT stands for paper time 50 of 100 (bench.core.defense.paper_epoch), where
# H-SAT's λ is 1 (plain PGD-AT, no curvature estimate) and P-SAT's 0.5; epoch 1 of 10 (paper time 5)
# keeps both in the constrained regime these tests are meant to cover (λ = 0 and λ ≈ 0.83).
EPOCHS = {"p_sat": 10, "h_sat": 10}


def ready(name: str, model: nn.Module, ctx, **params):
    """The defense with `setup` and `on_epoch_start(1)` done, as the trainer hands it a first batch
    (of a run of EPOCHS.get(name, 1) epochs)."""
    ctx.epochs = EPOCHS.get(name, ctx.epochs)
    defense = DEFENSES.get(name)(**params)
    defense.setup(model, ctx)
    defense.on_epoch_start(1, ctx)
    return defense


def record_forwards(model):
    """Returns (inputs, modes, handle): each forward's input tensor and model.training."""
    inputs, modes = [], []

    def hook(module, args):
        inputs.append(args[0].detach().clone())
        modes.append(module.training)

    return inputs, modes, model.register_forward_pre_hook(hook)


def ce(model, x, y):
    return F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- every defense


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 0.5)])
@pytest.mark.parametrize("name", NAMES)
def test_training_step(name, norm, eps, synthetic, data, make_ctx):
    model = model_for(name, synthetic)
    assert model.training
    x, y = data
    x_before = x.clone()
    ctx = make_ctx(model, norm, eps)
    defense = ready(name, model, ctx)
    torch.manual_seed(0)
    loss = defense.training_step(model, x, y, ctx)

    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert torch.isfinite(loss) and loss.requires_grad
    assert all(m.training for m in model.modules()), "the model was not switched back to train mode"
    assert torch.equal(x, x_before), "the defense modified the batch"
    # the inner maximization takes input gradients only: no parameter gradient leaks into the step
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: no gradient reaches {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_defense_is_deterministic_given_the_seed(name, synthetic, data, make_ctx):
    """Two fresh defenses on two copies of the model (a defense may take optimizer steps of its
    own, as Free-AT does) give the same loss from the same seed."""
    x, y = data
    losses = []
    for _ in range(2):
        model = model_for(name, synthetic)
        ctx = make_ctx(model)
        torch.manual_seed(1)
        defense = ready(name, model, ctx)
        losses.append(defense.training_step(model, x, y, ctx).item())
    assert losses[0] == losses[1]


# Model parameters a defense needs beyond the tiny small_cnn (SPAT trains a normalized head).
MODEL_PARAMS = {"spat": {"head": "cosine"}}
ONE_EPOCH = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "val_steps": 2}


@pytest.mark.parametrize("name", NAMES)
def test_one_epoch_with_the_trainer(name, synthetic, tmp_path):
    """Every defense trains one epoch of the synthetic set through the shared trainer (its own
    pretrained runs, if any, included): checkpoints, a logged epoch, finite loss, counted passes."""
    spec = RunSpec(defense=name, dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", 0.1),
                   train=build_train_config(ONE_EPOCH), model_params={**TINY, **MODEL_PARAMS.get(name, {})}, seed=0)
    store = Store(str(tmp_path / "results.db"))
    result = train(spec, synthetic, store=store, checkpoint_root=tmp_path / "checkpoints", progress=False)
    assert result.trained_now and result.epochs_done == 1
    assert (result.directory / "best.pt").exists() and (result.directory / "last.pt").exists()
    with store.session() as s:
        run = s.get(Run, spec.run_id)
        assert run.status == "completed" and len(run.epoch_rows) == 1
        assert math.isfinite(run.epoch_rows[0].loss)
        assert run.forward_per_sample >= 1 and run.backward_per_sample >= 1


# Modes of the model's forwards in one step (T = train, F = eval). TRADES and MART generate x' in
# eval mode (the authors' code); Madry/Rice PGD-AT and Wong's fast AT attack in train mode.
MODES = {
    "natural": "T",
    "fgsm_at": "TT",
    "fast_at": "TT",
    "pgd_at": "T" * 11,
    "trades": "F" * 11 + "TT",  # p(x) without grad, 10 PGD steps, then f(x) and f(x')
    "mart": "F" * 10 + "TT",
    "spat": "F" * 11 + "TT",  # as TRADES: f(x) without grad, 10 PGD steps, then f(x) and f(x')
    "tat_dra": "F" * 5 + "T",  # 5 DRA steps in eval mode, then f([x; x_dra])
    "tgcl": "T",  # one student forward; the teacher's (eval mode) is another module
    # H-SAT (λ ≈ 0.83 at epoch 1 of 10): per PGD step f(x') and f at the shifted weights (one chunk of 32)
    "h_sat": "FF" * 10 + "T",
    # P-SAT (λ = 0 at epoch 1 of 10): data dependent; on this batch every sample is misclassified, so
    # frozen, by step 4 (the stopping rule itself: tests/test_defense_sat.py)
    "p_sat": "F" * 4 + "T",
    "sat_r1": "F" * 8 + "T",  # FGSM, 7 I-FGSM steps (eval, as the authors' code), f([x_fgsm; x_ifgsm])
    "sat_r2": "FFT",  # FGSM, R+FGSM (eval), f([x_fgsm; x_rfgsm])
    "sat_r3": "FT",  # one gradient (eval) for both FGSM sizes, f([x_low; x_high])
    "atlas": "TTT",  # FGSM from the random start (train mode, as fast_at), then f(x') and f(x)
    "jacobian_reg": "T",
    "alp": "F" * 10 + "T",  # 10 PGD steps in eval mode (the authors' code), then f([x; x'])
    "free_at": "T" * 8,  # m = 8 replays of the batch
    "eat": "TT",  # f(x), f(x_fgsm); a static source's forward is another module's
    # DAT at epoch 1 of 1 (c = 0.5·(1 − 0.5·120/100) = 0.2): on this fresh model every FOSC at the
    # random start is below c, so one eval-mode check per sample and no step, then f(x') (the
    # stopping rule: test_defense_baselines_b.py)
    "dat": "FT",
    # a 1-epoch run is all at full strength K = 7: parts 1-7 of the batch take PGD-1 … PGD-7 (train
    # mode, as the authors' code), then f(x_mix)
    "cat": "T" * (sum(range(1, 8)) + 1),
    "awp": "T" * 12,  # 10 PGD steps, ∇_w ρ at w (the proxy), ρ at w + v
    "gairat": "F" * 10 + "T",  # 10 GA-PGD steps (eval, as the authors' code), then f(x')
}


@pytest.mark.parametrize("name", NAMES)
def test_forward_modes(name, synthetic, data, make_ctx):
    if name not in MODES:
        pytest.fail(f"new defense {name!r}: add its expected forward modes to MODES")
    x, y = data
    model = model_for(name, synthetic)
    ctx = make_ctx(model)
    defense = ready(name, model, ctx)
    inputs, modes, handle = record_forwards(model)
    torch.manual_seed(0)
    defense.training_step(model, x, y, ctx)
    handle.remove()
    assert "".join("T" if m else "F" for m in modes) == MODES[name]


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_train_mode_restored_when_the_inner_max_fails(name, tiny_model, data, make_ctx, monkeypatch):
    def broken_pgd(*args, **kwargs):
        raise RuntimeError("inner maximization failed")

    monkeypatch.setattr({"trades": bench.adversary.training, "mart": defenses.mart}[name], "pgd", broken_pgd)
    with pytest.raises(RuntimeError, match="inner maximization failed"):
        DEFENSES.get(name)().training_step(tiny_model, *data, make_ctx(tiny_model))
    assert tiny_model.training


def test_paper_defaults():
    cfg = {name: DEFENSES.get(name)().config for name in NAMES}
    assert cfg["fgsm_at"].alpha == 0.5
    assert cfg["fast_at"].step_ratio == 1.25
    assert (cfg["pgd_at"].steps, cfg["pgd_at"].step_ratio) == (10, 0.25)
    assert (cfg["trades"].beta, cfg["trades"].steps) == (6.0, 10)
    assert cfg["trades"].step_ratio * 0.031 == pytest.approx(0.007)
    assert (cfg["mart"].beta, cfg["mart"].steps) == (5.0, 10)
    assert cfg["mart"].step_ratio * 0.031 == pytest.approx(0.007)


PGD_LIKE = ("pgd_at", "trades", "mart", "alp", "gairat", "spat", "awp", "dat", "p_sat", "h_sat")


@pytest.mark.parametrize("name, params, field", [
    (name, {field: value}, field)
    for names, field, value in [
        (PGD_LIKE, "steps", 0),
        (PGD_LIKE + ("fast_at", "free_at", "atlas"), "step_ratio", 0.0),
        (PGD_LIKE + ("fast_at", "free_at"), "step_ratio", -0.25),
        (("cat",), "max_steps", 0),
        (("cat",), "step_budget", 0.0),
        (("trades", "mart", "spat"), "init_std", -0.001),
    ]
    for name in names
])
def test_bad_attack_parameters_are_refused(name, params, field):
    """No steps or a non-positive step would silently train on the start point (or walk backwards):
    a one-line BenchError that names the field."""
    with pytest.raises(BenchError) as error:
        DEFENSES.get(name)(**params)
    message = str(error.value)
    assert field in message and name in message and "\n" not in message, message


def test_paper_epoch_is_the_middle_of_the_covered_paper_epochs():
    """(epoch − ½)·P/E: symmetric about P/2 for every budget, the identity less ½ at E = P (a step at
    paper epoch s switches at 1-based epoch s + 1), and inside [0, P) always."""
    assert [paper_epoch(e, 4, 100) for e in range(1, 5)] == [12.5, 37.5, 62.5, 87.5]
    assert [paper_epoch(e, 100, 100) for e in (1, 41, 100)] == [0.5, 40.5, 99.5]
    assert paper_epoch(1, 1, 60) == 30 and paper_epoch(3, 12, 1.0) == pytest.approx(2.5 / 12)
    for epochs in (1, 2, 3, 7, 200):
        times = [paper_epoch(e, epochs, 190) for e in range(1, epochs + 1)]
        assert times == sorted(times) and 0 < times[0] and times[-1] < 190
        assert times[0] + times[-1] == pytest.approx(190)
    assert min(e for e in range(1, 101) if paper_epoch(e, 100, 100) >= 40) == 41


def test_trainer_puts_the_model_back_in_train_mode_before_every_step(synthetic, tmp_path, registered):
    """A defense that leaves the model in eval mode loses only that step: the trainer calls
    model.train() before each training_step, not once per epoch."""
    modes = []

    class LeaksEvalMode(Defense):
        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

        def training_step(self, model, x, y, ctx):
            modes.append(model.training)
            loss = F.cross_entropy(model(x), y)
            model.eval()  # forgets to switch back
            return loss

    registered(DEFENSES, "test_leaks_eval_mode", LeaksEvalMode)
    spec = RunSpec(defense="test_leaks_eval_mode", dataset="synthetic", model="small_cnn",
                   threat=ThreatModel("Linf", 0.1), train=build_train_config({**ONE_EPOCH, "epochs": 2}),
                   model_params=TINY, seed=0)
    train(spec, synthetic, store=Store(str(tmp_path / "results.db")), checkpoint_root=tmp_path / "checkpoints",
          progress=False)
    assert len(modes) == 2 * 4 and all(modes)  # 256 samples in batches of 64, two epochs


# --------------------------------------------------------------------------- pass counting

# Forward / backward passes per training sample in one step, including the trainer's
# loss.backward(). A no-grad forward has no backward; a forward that is back-propagated twice
# (by autograd.grad for the input gradient and again by loss.backward) counts two backwards.
#   natural  1 / 1
#   fgsm_at  2 / 3: f(x) is back-propagated for ∇ₓ (FGSM direction) and again by loss.backward
#            for the parameter gradient of the clean term; f(x_fgsm) once.
#   fast_at  2 / 2: one step from the random start, then f(x').
#   pgd_at   11 / 11: 10 steps, then f(x').
#   trades   13 / 12: p(x) without grad, 10 steps, then f(x) and f(x') (both back-propagated).
#   mart     12 / 12: 10 steps, then f(x) and f(x').
#   spat     13 / 12: as trades (f(x) without grad, 10 steps on the robustness loss, f(x), f(x')).
#   tat_dra  7 / 7 in an adversarial epoch: 5 DRA steps, then one forward of [x; x_dra] (2B outputs
#            per B samples). 1 / 1 in the clean-only epochs. The natural pre-training is its own run.
#   tgcl     1 / 2 in phase 1 (checked here): f(x) is back-propagated for J_S = ∇ₓp_y (create_graph)
#            and by loss.backward (a double backward). 1 / 3 in phase 2 (+ ∇ₓCE; tests/test_defense_tgcl.py).
#            Not counted: the teacher's forward/backward per sample (own module) and the discriminators.
#   h_sat    21 / 11 while λ < 1: per step f(x') back-propagated once (to x and θ together) and a
#            no-grad forward at the shifted weights; then f(x'). 11 / 11 once λ = 1 (PGD-AT).
#   p_sat    2 / 2 with 1 step (checked here: the first step always runs on every sample). With K
#            steps 1 + Σ_k (share of samples still within λ at step k): data dependent, between
#            2 / 2 and K + 1 (tests/test_defense_sat.py checks it against Algorithm 1).
#   sat_r1   2 + 8/B each with k = 1 pair: FGSM of B, 7 I-FGSM steps of 1 sample, f([x_fgsm; x_ifgsm])
#            of B + 1 (2.25 at B = 32; 2.06 at 128). Table 8 of the paper counts only the
#            generation: 1 FBP (+ 7 for the one I-FGSM sample).
#   sat_r2   4 / 4: FGSM and R+FGSM (B each), then f([x_fgsm; x_rfgsm]) (2B). Table 8: 1 FBP.
#   sat_r3   3 / 3: one gradient for both sizes, then f([x_low; x_high]) (2B). Table 8: 1 FBP.
#   atlas    3 / 4: FGSM from the random start; f(x') back-propagated for the Jacobian estimate vᵀJ
#            (create_graph) and again by loss.backward; f(x) once. K PGD steps: K + 2 / K + 3. Not
#            counted: the double backward through the vᵀJ graph inside loss.backward (about one more
#            forward + backward of work), which passes through no model output.
#   jacobian_reg 1 / 2: f(x) back-propagated for vᵀJ and by loss.backward (+ the uncounted double backward).
#   alp      12 / 12: 10 PGD steps, then f([x; x']) (2B outputs per B samples).
#   free_at  8 / 8: m = 8 replays, one forward and one backward each (7 in training_step, which also
#            takes 7 of the 8 optimizer steps, and the trainer's).
#   eat      2 / 3 when the current model is the source (checked here: the seed-0 draw picks it): f(x) is
#            back-propagated for ∇ₓ and by loss.backward, then f(x_fgsm). 2 / 2 from a static model,
#            whose forward / backward (one each) and natural pre-training (its own run) are not counted.
#   dat      2 / 2 here (see MODES). In general 1 + Σ_k (share of samples still above c_t at check k),
#            between 2 / 2 and K + 1; data dependent (tests/test_defense_baselines_b.py).
#   cat      At strength l: 1 + Σ_i i·|part_i|/B ≈ 1 + l/2; 1 / 1 in lesson 0 (clean). Checked here at
#            l = K = 7 (a 1-epoch run): parts of 32 // 8 = 4, 1 + 4·(1 + … + 7)/32 = 4.5 / 4.5.
#   awp      12 / 12: 10 steps, ∇_w ρ at w, then ρ at w + v. 11 / 11 during the warm-up (PGD-AT).
#            TRADES base: 15 / 14 (p(x) without grad, 10 steps, f(x) and f(x') twice).
#   gairat   11 / 11: 10 steps (κ is counted on the same forwards), then f(x').
PASSES = {"natural": (1, 1), "fgsm_at": (2, 3), "fast_at": (2, 2), "pgd_at": (11, 11),
          "trades": (13, 12), "mart": (12, 12), "spat": (13, 12), "tat_dra": (7, 7), "tgcl": (1, 2),
          "h_sat": (21, 11), "p_sat": (2, 2), "sat_r1": (2.25, 2.25), "sat_r2": (4, 4), "sat_r3": (3, 3),
          "atlas": (3, 4), "jacobian_reg": (1, 2), "alp": (12, 12), "free_at": (8, 8),
          "eat": (2, 3), "dat": (2, 2), "cat": (4.5, 4.5), "awp": (12, 12), "gairat": (11, 11)}
STEPS = {"pgd_at": 10, "trades": 10, "mart": 10, "spat": 10, "tat_dra": 5, "h_sat": 10, "p_sat": 1}


@pytest.mark.parametrize("name", NAMES)
def test_passes_per_sample(name, synthetic, data, make_ctx):
    if name not in PASSES:
        pytest.fail(f"new defense {name!r}: add its expected passes to PASSES")
    x, y = data
    params = {"steps": STEPS[name]} if name in STEPS else {}
    model = model_for(name, synthetic)
    ctx = make_ctx(model)
    defense = ready(name, model, ctx, **params)
    torch.manual_seed(0)
    with count_passes(model) as counter:
        defense.training_step(model, x, y, ctx).backward()
    assert (counter.forward / B, counter.backward / B) == PASSES[name]


def test_passes_scale_with_steps(tiny_model, data, make_ctx):
    x, y = data
    for name, extra_f, extra_b in [("pgd_at", 1, 1), ("trades", 3, 2), ("mart", 2, 2)]:
        torch.manual_seed(0)
        with count_passes(tiny_model) as counter:
            DEFENSES.get(name)(steps=3).training_step(tiny_model, x, y, make_ctx(tiny_model)).backward()
        assert (counter.forward, counter.backward) == ((3 + extra_f) * B, (3 + extra_b) * B), name


# --------------------------------------------------------------------------- natural


def test_natural_is_cross_entropy(trained, data, make_ctx):
    x, y = data
    loss = DEFENSES.get("natural")().training_step(trained, x, y, make_ctx(trained))
    expected = F.cross_entropy(trained(x), y)
    torch.testing.assert_close(loss, expected)
    assert DEFENSES.get("natural").selection_metric == "clean"


# --------------------------------------------------------------------------- fgsm_at


def fgsm_linf(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x.detach() + eps * grad.sign()).clamp(0, 1)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_fgsm_at_loss(alpha, trained, data, make_ctx):
    """alpha·CE(x) + (1 − alpha)·CE(x_fgsm), x_fgsm = clip(x + eps·sign ∇ₓCE(x)) held constant."""
    x, y = data
    eps = 0.1
    loss = DEFENSES.get("fgsm_at")(alpha=alpha).training_step(trained, x, y, make_ctx(trained, eps=eps))
    loss.backward()
    got = [p.grad.clone() for p in trained.parameters()]
    trained.zero_grad()

    x_fgsm = fgsm_linf(trained, x, y, eps)
    clean, adv = ce(trained, x, y), ce(trained, x_fgsm, y)
    assert adv > clean + 0.5  # the two terms differ, so the weighting is tested
    expected = alpha * clean + (1 - alpha) * adv
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    for g, p in zip(got, trained.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- fast_at


def fast_at_example(model, x, y, eps, step_ratio, seed):
    """Wong et al. 2020, Alg. 3, written out: δ ~ U(−ε, ε), one signed step of step_ratio·ε,
    projection onto the ball and [0, 1]. Returns (x', ∇ at the start)."""
    torch.manual_seed(seed)
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(start), y), start)
    delta = (start.detach() + step_ratio * eps * grad.sign() - x).clamp(-eps, eps)
    return (x + delta).clamp(0, 1), grad


@pytest.mark.parametrize("step_ratio", [1.25, 2.0])
def test_fast_at_example(step_ratio, tiny_model, data, make_ctx):
    x, y = data
    eps = 0.1
    inputs, _, handle = record_forwards(tiny_model)
    torch.manual_seed(3)
    loss = DEFENSES.get("fast_at")(step_ratio=step_ratio).training_step(tiny_model, x, y,
                                                                         make_ctx(tiny_model, eps=eps))
    handle.remove()
    x_adv = inputs[-1]
    expected, grad = fast_at_example(tiny_model, x, y, eps, step_ratio, seed=3)
    assert (x_adv - expected).abs().max() <= 1e-6
    torch.testing.assert_close(loss, ce(tiny_model, x_adv, y))

    delta = x_adv - x
    assert delta.abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # not plain FGSM: with α = 1.25ε the random start leaves ~37% of the coordinates inside the
    # ball (FGSM puts all on x ± ε); with α = 2ε they all end on the boundary, but where the
    # gradient's sign at the start differs from its sign at x (~20% here), on the other side
    fgsm = fgsm_linf(tiny_model, x, y, eps)
    off_fgsm = ((x_adv - fgsm).abs() > 1e-4).float().mean()
    assert off_fgsm > (0.3 if step_ratio < 2 else 0.1)

    # coordinates neither clipped by the box nor with a zero gradient
    free = (x_adv > 0) & (x_adv < 1) & (grad != 0)
    assert free.float().mean() > 0.5
    on_boundary = (delta.abs() - eps).abs() <= 1e-6
    fraction = on_boundary[free].float().mean().item()
    if step_ratio >= 2.0:
        # from anywhere in [−ε, ε] a step of 2ε crosses the boundary: every coordinate ends on it
        assert fraction == 1.0
    else:
        # u + 1.25ε·s reaches the boundary iff u·s >= −0.25ε: probability 0.625 for u ~ U(−ε, ε)
        assert 0.55 < fraction < 0.7


# --------------------------------------------------------------------------- pgd_at


def test_pgd_at_loss(trained, data, make_ctx):
    """CE at a PGD example (10 steps of eps/4 from a uniform start), recomputed independently;
    on the trained model it is far above the clean CE."""
    x, y = data
    eps = 0.1
    torch.manual_seed(4)
    loss = DEFENSES.get("pgd_at")().training_step(trained, x, y, make_ctx(trained, eps=eps))

    torch.manual_seed(4)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(10):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(trained(x_adv), y), x_adv)
        x_adv = (x + (x_adv.detach() + 0.25 * eps * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(loss, ce(trained, x_adv, y), rtol=1e-5, atol=1e-6)

    clean = ce(trained, x, y).item()
    assert clean < 0.05
    assert loss.item() > clean + 1.0


# --------------------------------------------------------------------------- trades


def kl(p_logits, q_logits):
    """Per-sample KL(softmax(p) ‖ softmax(q)) = Σ p (log p − log q), logs taken stably."""
    log_p, log_q = F.log_softmax(p_logits, dim=1), F.log_softmax(q_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def test_trades_beta_zero_is_cross_entropy(trained, data, make_ctx):
    x, y = data
    torch.manual_seed(0)
    loss = DEFENSES.get("trades")(beta=0.0).training_step(trained, x, y, make_ctx(trained))
    torch.testing.assert_close(loss, ce(trained, x, y))


def test_trades_loss_decomposes(trained, data, make_ctx):
    """loss = CE(f(x), y) + β·mean KL(f(x) ‖ f(x')), with gradients through both f(x) and f(x');
    the KL term is >= 0 and the inner maximization raised it above its value at the start."""
    x, y = data
    eps, beta = 0.1, 6.0
    inputs, _, handle = record_forwards(trained)
    torch.manual_seed(0)
    loss = DEFENSES.get("trades")(beta=beta).training_step(trained, x, y, make_ctx(trained, eps=eps))
    handle.remove()
    start, x_adv = inputs[1], inputs[-1]
    assert torch.equal(inputs[0], x) and torch.equal(inputs[-2], x)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert 0 < (start - x).abs().max() <= 0.01  # x + 0.001·N(0, I)

    loss.backward()
    got = [p.grad.clone() for p in trained.parameters()]
    trained.zero_grad()
    logits, logits_adv = trained(x), trained(x_adv)
    term = kl(logits, logits_adv)
    assert (term >= -1e-6).all()
    expected = F.cross_entropy(logits, y) + beta * term.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    for g, p in zip(got, trained.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-6)

    with torch.no_grad():
        assert term.mean() > 0.1
        assert term.mean() > 10 * kl(trained(x), trained(start)).mean()


# --------------------------------------------------------------------------- mart


class Tempered(nn.Module):
    """The trained model with logits divided by 4: moderately confident predictions, so the
    weights 1 − p_y(x) vary across samples and no probability is within 1e-4 of 1."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) / 4


@pytest.mark.parametrize("beta", [5.0, 0.0])
def test_mart_loss_matches_the_paper(beta, trained, data, make_ctx, monkeypatch):
    """Wang et al. 2020, Eq. (8), recomputed from the paper for a fixed x' (pgd patched):
    BCE(p(x'), y) = −log p_y(x') − log(1 − max_{k≠y} p_k(x')), plus
    β · mean KL(p(x) ‖ p(x')) · (1 − p_y(x))."""
    model = Tempered(trained).train()
    x, y = data
    eps = 0.1
    g = torch.Generator().manual_seed(0)
    x_fixed = (x + eps * torch.randint(0, 2, x.shape, generator=g).float().mul(2).sub(1)).clamp(0, 1)
    calls = []

    def fake_pgd(m, x_, loss_fn, **kwargs):
        calls.append(dict(kwargs, training=m.training, loss_fn=loss_fn, x=x_))
        return x_fixed

    monkeypatch.setattr(defenses.mart, "pgd", fake_pgd)
    loss = DEFENSES.get("mart")(beta=beta).training_step(model, x, y, make_ctx(model, eps=eps))

    (call,) = calls
    assert call["training"] is False  # x' generated in eval mode
    assert (call["eps"], call["norm"], call["steps"]) == (eps, "Linf", 10)
    assert call["step_size"] == pytest.approx(0.007 / 0.031 * eps)
    assert torch.equal(call["x"], x)
    assert 0 < (call["x_init"] - x).abs().max() <= 0.01  # x + 0.001·N(0, I)
    some_logits = torch.randn(B, 4, generator=g)
    torch.testing.assert_close(call["loss_fn"](some_logits), F.cross_entropy(some_logits, y, reduction="none"))

    with torch.no_grad():
        p, p_adv = F.softmax(model(x), dim=1), F.softmax(model(x_fixed), dim=1)
    idx = torch.arange(B)
    runner_up = p_adv.clone()
    runner_up[idx, y] = -1.0
    runner_up = runner_up.max(1).values
    # the code guards the logs with 1.0001 and 1e-12 (the authors' constants): their effect is
    # below 1e-4 / (1 − q) <= 1e-3 here
    assert runner_up.max() < 0.9
    bce = -torch.log(p_adv[idx, y]) - torch.log(1 - runner_up)
    kl_term = (p * (torch.log(p) - torch.log(p_adv))).sum(1)
    weight = 1 - p[idx, y]
    assert weight.std() > 0.05  # the weights differ across samples
    expected = bce.mean() + beta * (kl_term * weight).mean()
    assert abs(loss.item() - expected.item()) <= 2e-3, (loss.item(), expected.item())
    # the runner-up term matters: without it the loss would be off by far more than the tolerance
    assert (-torch.log(1 - runner_up)).mean() > 0.05


def mart_reference(model, x, x_adv, y, beta, detach_weight=False, detach_p=False):
    """Eq. (8) with gradients, from the paper: the runner-up as a masked max, the log guards as the
    authors' constants (1.0001, 1e-12, 1.0000001). `detach_*` cut one path, as a wrong
    implementation would."""
    p, p_adv = F.softmax(model(x), dim=1), F.softmax(model(x_adv), dim=1)
    idx = torch.arange(len(y))
    runner_up = p_adv.masked_fill(F.one_hot(y, p_adv.shape[1]).bool(), -1.0).max(1).values
    bce = -torch.log(p_adv[idx, y]) - torch.log(1.0001 - runner_up + 1e-12)
    p_kl = p.detach() if detach_p else p
    kl = (p_kl * (torch.log(p_kl + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    weight = 1.0000001 - p[idx, y]
    return bce.mean() + beta * (kl * (weight.detach() if detach_weight else weight)).mean()


def test_mart_gradients_flow_through_the_weight_and_both_distributions(trained, data, make_ctx, monkeypatch):
    """The gradient of MART's loss (x' fixed) is that of Eq. (8) with every path kept: through
    1 − p_y(x), p(x) and p(x') in the KL, and the BCE. Detaching the weight or p(x) changes the
    gradient far beyond the tolerance, so either mistake fails here."""
    model = Tempered(trained).train()
    x, y = data
    g = torch.Generator().manual_seed(0)
    x_fixed = (x + 0.1 * torch.randint(0, 2, x.shape, generator=g).float().mul(2).sub(1)).clamp(0, 1)
    monkeypatch.setattr(defenses.mart, "pgd", lambda *args, **kwargs: x_fixed)
    params = list(model.parameters())
    got = torch.autograd.grad(DEFENSES.get("mart")().training_step(model, x, y, make_ctx(model, eps=0.1)), params)

    def flat_grad(**detach):
        return torch.cat([g.flatten() for g in torch.autograd.grad(mart_reference(model, x, x_fixed, y, 5.0, **detach), params)])

    got, expected = torch.cat([g.flatten() for g in got]), flat_grad()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    for detach in ({"detach_weight": True}, {"detach_p": True}):
        assert (flat_grad(**detach) - expected).abs().max().item() > 1e-2 * scale, detach
