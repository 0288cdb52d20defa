"""Losses that run in fp32 under the trainer's bf16 autocast (`bench.adversary.regularizers.
full_precision`): TGCL, JAC and ATLAS (double backpropagation), SAT-R1/R2 (differences of nearby
logits). CPU autocast stands in for the trainer's CUDA autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.core.defense import DEFENSES

B = 16
GUARDED = ("tgcl", "jacobian_reg", "atlas", "sat_r1", "sat_r2")


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def step(name, model, x, y, ctx, autocast: bool):
    """One training step of a fresh `name` (seeded), under bf16 autocast or not; returns (loss, the
    dtypes of the outputs of the model's train-mode forwards)."""
    torch.manual_seed(0)
    defense = DEFENSES.get(name)()
    defense.setup(model, ctx)
    dtypes = []
    handle = model.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype) if m.training else None)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = defense.training_step(model, x, y, ctx)
    handle.remove()
    return loss, dtypes


@pytest.mark.parametrize("name", GUARDED + ("pgd_at",))
def test_the_loss_forwards_run_in_fp32_under_bf16_autocast(name, trained, synthetic, make_ctx):
    """Every train-mode forward of the guarded defenses (those the loss is built from) returns fp32
    logits under autocast; plain PGD-AT's return bf16, so autocast is really on."""
    x, y = synthetic.train_x[:B], synthetic.train_y[:B]
    loss, dtypes = step(name, trained, x, y, make_ctx(trained), autocast=True)
    assert dtypes and set(dtypes) == {torch.bfloat16 if name == "pgd_at" else torch.float32}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("name", ("tgcl", "jacobian_reg", "atlas"))
def test_a_guarded_step_does_not_depend_on_autocast(name, trained, synthetic, make_ctx):
    """TGCL, JAC and ATLAS run the whole step in fp32 (adversary and teacher included): the loss
    under autocast is the fp32 loss, up to float rounding (bf16 would be off by ~1e-2)."""
    x, y = synthetic.train_x[:B], synthetic.train_y[:B]
    ctx = make_ctx(trained)
    plain, _ = step(name, copy.deepcopy(trained), x, y, ctx, autocast=False)
    mixed, _ = step(name, copy.deepcopy(trained), x, y, ctx, autocast=True)
    torch.testing.assert_close(mixed, plain, rtol=1e-5, atol=1e-6)
