"""Schedules that defenses read by epoch: `paper_epoch`, the one rule that maps a run's epochs
onto a paper's, and the difficulty schedule λ(epoch) shared by H-SAT and P-SAT (Sitawarin,
Chakraborty & Wagner, AISec 2021, App. A and Fig. 5)."""

from __future__ import annotations

import numpy as np

from bench.core.config import require, require_choice
from bench.core.defense import TrainContext
from bench.core.errors import BenchError

SCHEDULES = ("linear", "step")


def paper_epoch(epoch: int, epochs: int, paper_epochs: float) -> float:
    """The paper time, in paper epochs from 0, that the run's `epoch` (from 1) of `epochs` stands
    for: the middle of the paper epochs it covers, (epoch − ½)·paper_epochs/epochs. With
    paper_epochs = 1 it is the fraction of training.

    Why the middle: run epoch e covers paper time [(e − 1)·P/E, e·P/E), and reading the schedule
    at the centre of that span treats both ends of training alike: the first and last run
    epochs stand for paper times P/2E and P − P/2E, symmetric about P/2. Reading at the start
    of the span instead reaches paper time 0 but never passes P − P/E, so a schedule that
    finishes late was cut short on small budgets (a 2-epoch P-SAT, whose λ rises to 1 by paper
    epoch 70 of 100, ended at λ = 0.5). With the middle, a schedule whose changes lie between
    P/2E and P − P/2E reaches both its start and its end value (on 2 epochs: between P/4 and
    3P/4, which P-SAT's 30 → 70 of 100 satisfies); a change outside that span is seen only in
    part (H-SAT's ramp from paper epoch 0 starts above its first value on any budget).

    A step at paper epoch s switches at the first run epoch whose middle passes s, i.e.
    (e − ½)·P/E ≥ s; at E = P that is 1-based epoch s + 1, exactly the paper's 0-based epoch s,
    while a linear ramp is then read half an epoch later than at the start of each epoch."""
    return (epoch - 0.5) * paper_epochs / epochs



def check_schedule(config) -> None:
    """BenchError unless `config` (schedule, schedule_epochs, schedule_values, paper_epochs)
    describes a schedule."""
    epochs, values = config.schedule_epochs, config.schedule_values
    require_choice(config.schedule, SCHEDULES, "schedule")
    if not epochs or len(epochs) != len(values):
        raise BenchError(f"schedule_epochs and schedule_values need the same, non-zero length; "
                         f"got {list(epochs)} and {list(values)}")
    if any(b < a for a, b in zip(epochs, epochs[1:])):
        raise BenchError(f"schedule_epochs must be non-decreasing, got {list(epochs)}")
    require(config, at_least_one=("paper_epochs",))


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
