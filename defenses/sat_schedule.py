"""The difficulty schedule λ(epoch) shared by H-SAT and P-SAT (Sitawarin, Chakraborty & Wagner,
AISec 2021, App. A and Fig. 5). No defense is registered here."""

from __future__ import annotations

import numpy as np

from bench.defense import TrainContext, paper_epoch

SCHEDULES = ("linear", "step")


def check_schedule(config) -> None:
    """ValueError unless `config` (schedule, schedule_epochs, schedule_values, paper_epochs)
    describes a schedule."""
    epochs, values = config.schedule_epochs, config.schedule_values
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {config.schedule!r}")
    if not epochs or len(epochs) != len(values):
        raise ValueError(f"schedule_epochs and schedule_values need the same, non-zero length; "
                         f"got {list(epochs)} and {list(values)}")
    if any(b < a for a, b in zip(epochs, epochs[1:])):
        raise ValueError(f"schedule_epochs must be non-decreasing, got {list(epochs)}")
    if config.paper_epochs < 1:
        raise ValueError(f"paper_epochs must be >= 1, got {config.paper_epochs}")


def curriculum_lambda(config, ctx: TrainContext) -> float:
    """λ during epoch `ctx.epoch` (from 1) of `ctx.epochs`: the schedule at the paper time
    p = `paper_epoch`(ctx.epoch, ctx.epochs, paper_epochs), the middle of the paper epochs the run's
    epoch covers, so the schedule keeps its shape under any budget and ends at its final value on
    short ones (a 2-epoch P-SAT trains at λ = 0, then 1). The knots are (schedule_epochs[i],
    schedule_values[i]) in paper epochs, a knot at s meaning the paper's value from its 0-based epoch
    s: "linear" interpolates between them, "step" takes the value of the last knot reached (at
    E = paper_epochs, from 1-based epoch s + 1, as the paper); both hold the end values outside the
    knots. At E = paper_epochs a linear ramp is read half an epoch after each epoch's start."""
    epochs, values = config.schedule_epochs, config.schedule_values
    p = paper_epoch(ctx.epoch, ctx.epochs, config.paper_epochs)
    if config.schedule == "linear":
        return float(np.interp(p, epochs, values))
    reached = [v for e, v in zip(epochs, values) if e <= p]
    return float(reached[-1] if reached else values[0])
