"""`python -m bench perf eval`: seconds and forward/backward passes per attack on a fixed model,
side by side, in the same run, with what `--against` names:

- `torchattacks` (default): torchattacks' equivalent configured alike. "s/pass" is seconds per
  (forward + backward) sample-pass: the speed of the implementation once the algorithms'
  different pass counts are factored out;
- `fp32`: the same attack on the fp32 reference path (IEEE fp32, NCHW, no cudnn.benchmark), ours
  on the device's fast path (`--fast`), both batched and seeded as an evaluation is (`run_attack`):
  the speed-up and the per-sample agreement of the robust verdicts;
- `none`: ours alone (seconds, passes, samples per second).

The fixed model is a PGD-trained small CNN on scikit-learn's digits, a model of `--model` trained
`--train-epochs` epochs of PGD-AT at `--shape` (real CIFAR-10 when the shape is its and it is on disk,
else random data of the shape; Linf 8/255), both trained once into the checkpoint folder like any
run, or any model checkpoint given with `--checkpoint`. Each attack runs `repeats` times, the two
sides alternating, on the same samples and seed; the table shows the fastest of the repeats.
Accuracy is robust accuracy at eps for both (a minimum-norm attack's point counts only within eps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from bench.core.attack import ATTACKS
from bench.core.errors import BenchError
from bench.core.models import eval_mode
from bench.core.threat import BALL_TOLERANCE, perturbation_norms
from bench.engine.counting import count_passes

DEFAULT_ATTACKS = ("fgsm", "pgd", "mim", "apgd_ce", "apgd_dlr", "apgd_t", "fab", "square", "deepfool", "autoattack")


@dataclass
class Timing:
    seconds: float
    forward: int
    backward: int
    accuracy: float


def reference_spec(epochs: int = 10):
    """The fixed model: `pgd_at` on digits, small CNN, Adam 3e-3, Linf 0.2 (the demo's recipe)."""
    from bench.core.threat import ThreatModel
    from bench.engine.runspec import RunSpec, build_train_config

    return RunSpec(defense="pgd_at", dataset="digits", model="small_cnn", threat=ThreatModel("Linf", 0.2),
                   train=build_train_config({"epochs": epochs, "batch_size": 64, "optimizer": "adam", "lr": 0.003,
                                             "weight_decay": 0.0}), seed=0, label="perf reference")


def _pairs(norm: str, eps: float, num_classes: int) -> dict[str, tuple[dict, Callable[[nn.Module], Callable]]]:
    """name -> (our parameters, torchattacks factory), both configured alike (paper defaults where
    torchattacks' differ: APGD 100 steps, FAB 100 steps, targeted versions over C − 1 targets)."""
    import torchattacks as ta

    steps, alpha = 20, 2.5 * eps / 20
    linf = norm == "Linf"
    pairs = {
        "fgsm": ({}, lambda m: ta.FGSM(m, eps=eps)),
        "pgd": ({"steps": steps, "step_size": alpha},
                lambda m: (ta.PGD if linf else ta.PGDL2)(m, eps=eps, alpha=alpha, steps=steps, random_start=True)),
        "mim": ({}, lambda m: ta.MIFGSM(m, eps=eps, alpha=eps / 10, steps=10, decay=1.0)),
        "apgd_ce": ({}, lambda m: ta.APGD(m, norm=norm, eps=eps, steps=100, loss="ce")),
        "apgd_dlr": ({}, lambda m: ta.APGD(m, norm=norm, eps=eps, steps=100, loss="dlr")),
        "apgd_t": ({"n_target_classes": num_classes - 1},
                   lambda m: ta.APGDT(m, norm=norm, eps=eps, steps=100, n_classes=num_classes)),
        "fab": ({"targeted": True, "n_target_classes": num_classes - 1},
                lambda m: ta.FAB(m, norm=norm, eps=eps, steps=100, multi_targeted=True, n_classes=num_classes)),
        "square": ({}, lambda m: ta.Square(m, norm=norm, eps=eps, n_queries=5000)),
        "deepfool": ({"norm": "L2"}, lambda m: ta.DeepFool(m, steps=50, overshoot=0.02)),
        "autoattack": ({"version": "standard"}, lambda m: ta.MultiAttack([
            ta.APGD(m, norm=norm, eps=eps, steps=100, loss="ce"),
            ta.APGDT(m, norm=norm, eps=eps, steps=100, n_classes=num_classes),
            ta.FAB(m, norm=norm, eps=eps, steps=100, multi_targeted=True, n_classes=num_classes),
            ta.Square(m, norm=norm, eps=eps, n_queries=5000, resc_schedule=False)])),  # as the official AA
    }
    if not linf:
        del pairs["mim"]  # torchattacks' MIFGSM is Linf only
    return pairs


def _time(model: nn.Module, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x, y, seed: int,
          device: torch.device, norm: str, eps: float) -> Timing:
    with eval_mode(model), count_passes(model) as counter:
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x_adv = run(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        forward, backward = counter.forward, counter.backward
        with torch.no_grad():  # robust at eps: still correct, or (minimum-norm attacks) farther than eps
            robust = (model(x_adv).argmax(1) == y) | (perturbation_norms(x_adv, x, norm) > eps + BALL_TOLERANCE)
        accuracy = robust.float().mean().item()
    for p in model.parameters():  # torchattacks' FAB leaves parameter gradients behind
        p.grad = None
    return Timing(seconds, forward, backward, accuracy)


def perf_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, num_classes: int, *,
              names=DEFAULT_ATTACKS, repeats: int = 3, seed: int = 0, device: torch.device = torch.device("cpu"),
              log: Callable[[str], None] = print) -> dict[str, tuple[Timing, Timing]]:
    """Time each named attack and its torchattacks equivalent; returns name -> (ours, theirs)."""
    attacks = ATTACKS
    pairs = _pairs(norm, eps, num_classes)
    unknown = [n for n in names if n not in pairs]
    if unknown:
        raise BenchError(f"no torchattacks equivalent to compare {', '.join(unknown)} with "
                         f"({norm}); accepted: {', '.join(pairs)}")
    model = model.to(device)
    x, y = x.to(device), y.to(device)
    n = len(x)
    log(f"{'attack':<11} {'ours s':>8} {'theirs s':>8} {'ours f/b per sample':>20} {'theirs f/b':>12} "
        f"{'s/pass ratio':>13} {'acc ours':>9} {'theirs':>7}")
    results = {}
    for name in names:
        params, factory = pairs[name]
        ours = attacks.get(name)(**{"norm": norm, "eps": eps, **params})
        theirs = factory(model)
        if hasattr(theirs, "set_model_training_mode"):
            theirs.set_model_training_mode(model_training=False)
        runs = [], []
        for _ in range(repeats):
            runs[0].append(_time(model, lambda a, b: ours(model, a, b), x, y, seed, device, ours.config.norm, eps))
            runs[1].append(_time(model, lambda a, b: theirs(a, b), x, y, seed, device, ours.config.norm, eps))
        best = tuple(min(r, key=lambda t: t.seconds) for r in runs)
        results[name] = best
        a, b = best
        per_pass = [t.seconds / max(t.forward + t.backward, 1) for t in best]
        log(f"{name:<11} {a.seconds:8.2f} {b.seconds:8.2f} {a.forward / n:9.1f}/{a.backward / n:<9.1f} "
            f"{b.forward / n:6.1f}/{b.backward / n:<5.1f} {per_pass[0] / per_pass[1]:13.2f} "
            f"{a.accuracy:9.1%} {b.accuracy:7.1%}")
    return results


def shape_spec(model: str, model_params: dict, shape: tuple[int, int, int], n_test: int, epochs: int,
               data_dir: str | None, device: torch.device):
    """The model of `--model` at `--shape`: PGD-AT (10 steps) for `epochs` epochs, Linf 8/255, Adam
    1e-3 (learns in one epoch with or without BatchNorm; bf16 autocast on CUDA), on real CIFAR-10
    when the shape is its and it is on disk, else on 10,000 random training images of the shape and
    max(`n_test`, 1,000) test images (so 1,000 and fewer samples share one model). Their classes lie
    far apart: nearly every sample stays robust and every attack spends its whole budget, the
    slowest case."""
    from bench.app.perf_train import CIFAR_SHAPE
    from bench.core.data import load_dataset
    from bench.core.threat import ThreatModel
    from bench.engine.runspec import RunSpec, build_train_config

    dataset, options = "synthetic", {"n_train": 10000, "n_val": 200, "n_test": max(n_test, 1000), "num_classes": 10,
                                     "shape": list(shape)}
    if tuple(shape) == CIFAR_SHAPE:
        try:
            load_dataset("cifar10", data_dir=data_dir, download=False)
            dataset, options = "cifar10", {}
        except BenchError:
            pass
    return RunSpec(defense="pgd_at", dataset=dataset, model=model, threat=ThreatModel("Linf", 8 / 255),
                   train=build_train_config({"epochs": epochs, "batch_size": 128, "optimizer": "adam", "lr": 1e-3,
                                             "weight_decay": 0.0, "schedule": "constant", "val_samples": 200,
                                             "amp": device.type == "cuda"}),
                   model_params=dict(model_params), dataset_options=options, seed=0, label="perf shape")


def load_reference(checkpoint: str | None, checkpoint_root: str | Path, db: str, data_dir: str | None,
                   device: torch.device, spec=None):
    """(model, dataset, norm, eps): the given checkpoint, or the run `spec` (default: the digits
    reference model), trained if needed."""
    from bench.core.data import load_dataset
    from bench.engine.checkpoint import load_model
    from bench.engine.trainer import train
    from bench.store import Store

    if checkpoint is None:
        spec = spec or reference_spec()
        data = load_dataset(spec.dataset, data_dir=data_dir, **spec.dataset_options)
        result = train(spec, data, store=Store(db), checkpoint_root=checkpoint_root, device=device)
        checkpoint = result.directory / "best.pt"
    model, meta = load_model(checkpoint)
    data = load_dataset(meta["dataset"], data_dir=data_dir, **meta.get("dataset_options", {}))
    return model, data, meta["norm"], meta["eps"]


@dataclass
class Side:
    """One side of a comparison of ours: seconds, passes and per-sample robust verdicts."""

    seconds: float
    forward: int
    backward: int
    robust: torch.Tensor


def _run_ours(model: nn.Module, attack, x, y, batch_size: int, seed: int, device: torch.device, fast) -> Side:
    from bench.engine.evaluation import run_attack

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with fast.backends(device):
        result = run_attack(model, attack, x, y, batch_size, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Side(result.seconds, result.forward, result.backward, result.correct)


def perf_ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs, *, against: str, batch_size: int,
              fast, repeats: int = 1, seed: int = 0, device: torch.device = torch.device("cpu"),
              prepare: Callable = lambda attack: None,
              log: Callable[[str], None] = print) -> dict[str, tuple[Side, Side | None]]:
    """Time each attack (`AttackSpec`) on the fast path `fast`, alone (`against="none"`) or with the
    fp32 reference path (`"fp32"`): same samples, batches and seeds; `prepare(attack)` gives an
    attack what it needs first (a transfer surrogate). Returns label -> (fast, reference)."""
    import copy

    from bench.engine.fastpath import FastPath

    x, y, n = x.to(device), y.to(device), len(x)
    fast_model = copy.deepcopy(model).to(device).eval()
    if fast.channels_last:
        fast_model.to(memory_format=torch.channels_last)
    reference_model, reference = copy.deepcopy(model).to(device).eval(), FastPath()
    if against == "fp32":
        log(f"{'attack':<14} {'fast s':>8} {'fp32 s':>8} {'speed-up':>8} {'f/b per sample':>15} {'acc fast':>9} "
            f"{'fp32':>7} {'agree':>7}  disagreements (fast robust / fp32 robust)")
    else:
        log(f"{'attack':<14} {'seconds':>8} {'samples/s':>10} {'f/b per sample':>15} {'accuracy':>9}")
    results = {}
    for spec in specs:
        attack = spec.build()
        prepare(attack)
        runs = [], []
        for _ in range(repeats):
            runs[0].append(_run_ours(fast_model, attack, x, y, batch_size, seed, device, fast))
            if against == "fp32":
                runs[1].append(_run_ours(reference_model, attack, x, y, batch_size, seed, device, reference))
        a = min(runs[0], key=lambda side: side.seconds)
        b = min(runs[1], key=lambda side: side.seconds) if runs[1] else None
        results[spec.label] = (a, b)
        passes = f"{a.forward / n:7.1f}/{a.backward / n:<7.1f}"
        if b is None:
            log(f"{spec.label:<14} {a.seconds:8.2f} {n / a.seconds:10.1f} {passes:>15} {a.robust.float().mean().item():9.1%}")
            continue
        differ = a.robust != b.robust
        log(f"{spec.label:<14} {a.seconds:8.2f} {b.seconds:8.2f} {b.seconds / a.seconds:7.2f}x {passes:>15} "
            f"{a.robust.float().mean().item():9.1%} {b.robust.float().mean().item():7.1%} "
            f"{1 - differ.float().mean().item():7.2%}  {int((differ & a.robust).sum())} / {int((differ & b.robust).sum())}")
    return results
