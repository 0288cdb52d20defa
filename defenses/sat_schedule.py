"""The difficulty schedule λ(epoch) shared by H-SAT and P-SAT (Sitawarin, Chakraborty & Wagner,
AISec 2021, App. A and Fig. 5). No defense is registered here."""

from __future__ import annotations

import numpy as np

from bench.defense import TrainContext

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
    """λ during epoch `ctx.epoch` (from 1) of `ctx.epochs`: the paper's λ at its 0-based epoch
    p = (ctx.epoch − 1)·paper_epochs/ctx.epochs, so the schedule keeps its shape under any budget
    (exactly the paper's when ctx.epochs = paper_epochs). The knots are (schedule_epochs[i],
    schedule_values[i]) in paper epochs: "linear" interpolates between them, "step" takes the value
    of the last knot reached; both hold the end values outside the knots."""
    epochs, values = config.schedule_epochs, config.schedule_values
    p = (ctx.epoch - 1) * config.paper_epochs / ctx.epochs
    if config.schedule == "linear":
        return float(np.interp(p, epochs, values))
    reached = [v for e, v in zip(epochs, values) if e <= p]
    return float(reached[-1] if reached else values[0])
