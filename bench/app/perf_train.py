"""`python -m bench perf train`: images per second of one defense's full training step on the
trainer's fast path, next to the textbook loop in the same run, with the model FLOPs per image
(counted by `torch.utils.flop_counter`), the MFU against the device's bf16 dense peak where it is
known (`PEAK_BF16_TFLOPS`) and the peak memory.

- fast: the trainer's own step (`bench.engine.trainer.optimization_step` on `training_batch`
  batches: data and augmentation on the device, bf16 autocast on CUDA, the defense's input-only
  attack gradients) under the device's fast path (`bench.engine.fastpath`), the loss read once
  every `sync_every` steps;
- reference, for `pgd_at`: the textbook PGD-AT loop with the same steps and step size: fp32, NCHW,
  each batch copied from host memory, `loss.backward()` inside the attack (weight gradients
  computed and thrown away), `.item()` every step, torch's default backend flags; for any other
  defense: the trainer's step with every fast-path option off, no autocast, `.item()` every step.

Both loops train their own copy of the same initial model on the same batches (unaugmented in the
reference), after `warmup` steps each, in `rounds` alternating rounds of `steps` steps; the figure
of a loop is its fastest round. Real CIFAR-10 when it is on disk (shape 3x32x32), else random data
of the shape (the `synthetic` dataset: prototypes plus noise, 10 classes); the output says which.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bench.app.plan import stand_ins
from bench.core.data import Dataset, load_dataset
from bench.core.defense import DEFENSES, TrainContext
from bench.core.errors import BenchError
from bench.core.models import build_model
from bench.core.threat import ThreatModel
from bench.engine.fastpath import FastPath
from bench.engine.provenance import device_name
from bench.engine.runspec import TrainConfig
from bench.engine.trainer import LossMonitor, _optimizer, optimization_step, training_batch

CIFAR_SHAPE = (3, 32, 32)
THREAT = ThreatModel("Linf", 8 / 255)
# bf16 dense tensor-core peaks (TFLOP/s, vendor datasheets), matched in order against the device name
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))


@dataclass
class LoopTiming:
    name: str
    seconds_per_step: float
    flops_per_image: float
    peak_bytes: int | None  # CUDA: peak allocated during the timed rounds; None on the CPU


def parse_shape(text: str) -> tuple[int, int, int]:
    """"3x32x32" -> (3, 32, 32)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise BenchError(f"--shape must be CxHxW with positive integers, e.g. 3x32x32; got {text!r}")
    return shape  # type: ignore[return-value]


def perf_data(shape: tuple[int, int, int], n: int, data_dir: str | None) -> tuple[Dataset, str]:
    """Real CIFAR-10 when the shape is CIFAR's and its files are on disk (never downloaded here),
    else `n` random images of the shape; with a line saying which."""
    if tuple(shape) == CIFAR_SHAPE:
        try:
            data = load_dataset("cifar10", data_dir=data_dir, download=False)
            return data, f"real CIFAR-10 ({data.source.split(';')[0]})"
        except BenchError:
            pass
    data = load_dataset("synthetic", n_train=n, n_val=1, n_test=1, num_classes=10, shape=list(shape))
    where = "CIFAR-10 not found on disk (--data-dir), so " if tuple(shape) == CIFAR_SHAPE else ""
    return data, f"{where}random data of shape {'x'.join(map(str, shape))} (synthetic prototypes + noise, 10 classes)"


def peak_tflops(device: torch.device) -> tuple[str, float] | None:
    """(device name, bf16 dense peak in TFLOP/s) when the device is one of PEAK_BF16_TFLOPS."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(((name, peak) for key, peak in PEAK_BF16_TFLOPS if key in name), None)


class StepLoop:
    """One loop's model, optimizer and step function (`step(i)` runs optimization step i): the
    trainer's step on the fast path `fast` (with bf16 autocast when `amp`), or with `fast` None the
    reference loop. The runs a defense trains on demand are untrained stand-ins."""

    def __init__(self, name: str, defense_name: str, defense_params: dict, model_name: str, model_params: dict,
                 data: Dataset, batch_size: int, device: torch.device, fast: FastPath | None, *,
                 threat: ThreatModel = THREAT, train: TrainConfig | None = None, amp: bool | None = None,
                 pretrained_train: dict | None = None):
        self.name, self.device, self.fast = name, device, fast
        self.amp = device.type == "cuda" if amp is None else amp
        train = train or TrainConfig()
        self.defense = DEFENSES.get(defense_name)(**defense_params)
        torch.manual_seed(0)
        self.model = build_model(model_name, num_classes=data.num_classes, input_shape=data.input_shape,
                                 mean=data.mean, std=data.std, **model_params).to(device)
        self.optimizer = _optimizer(train, self.model)
        self.batch_size, self.steps_per_epoch = batch_size, max(1, len(data.train_x) // batch_size)
        self.ctx = TrainContext(threat=threat, num_classes=data.num_classes, input_shape=data.input_shape,
                                epochs=train.epochs, device=device, optimizer=self.optimizer,
                                steps_per_epoch=self.steps_per_epoch,
                                pretrained=stand_ins(data, threat, model_name, model_params, train, 0,
                                                     f"defense {defense_name!r}", self.defense.pretrained_defenses,
                                                     pretrained_train, device=device))
        self.defense.setup(self.model, self.ctx)
        self.data = data.to(device) if fast is not None else data
        self.generator = torch.Generator(device=self.data.train_x.device).manual_seed(0)
        self.order = torch.randperm(len(data.train_x), generator=self.generator, device=self.data.train_x.device)
        self.monitor = LossMonitor(device)
        self.textbook = fast is None and defense_name == "pgd_at"

    def prepare(self) -> None:
        """The fast path's model transformation (after the FLOPs are counted on the eager model)."""
        if self.fast is not None:
            self.fast.prepare(self.model, double_backward=self.defense.double_backward, log=print)

    def step(self, i: int) -> None:
        self.ctx.step = i
        k = i % self.steps_per_epoch
        if self.fast is not None:
            x, y = training_batch(self.data, self.order, k, self.batch_size, self.generator)
            loss = optimization_step(self.model, self.defense, x, y, self.ctx, self.optimizer, self.amp)
            self.monitor.add(loss, len(y), i)
            if (i + 1) % self.fast.sync_every == 0:
                self.monitor.check()
            return
        idx = self.order[k * self.batch_size:(k + 1) * self.batch_size]
        x, y = self.data.train_x[idx].to(self.device), self.data.train_y[idx].to(self.device)
        if self.textbook:
            eps = self.ctx.threat.eps
            _textbook_pgd_at_step(self.model, self.optimizer, x, y, eps, self.defense.config.steps,
                                  self.defense.config.step_ratio * eps)
        else:
            optimization_step(self.model, self.defense, x, y, self.ctx, self.optimizer, False).item()

    def finish(self) -> None:
        """Wait for the device (and read the loss, as the trainer does at a sync point)."""
        if self.fast is not None:
            self.monitor.check()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def flops_per_image(self, i: int) -> float:
        with _FlopCounter() as counter:
            self.step(i)
        self.finish()
        return counter.get_total_flops() / self.batch_size


class _FlopCounter(FlopCounterMode):
    """`FlopCounterMode` counting the whole block only: its per-module tracker hooks the backward
    of every module output, which fails under `torch.autograd.grad` (the attacks' input gradients)."""

    class _Global:
        parents = ("Global",)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def __init__(self):
        super().__init__(display=False)
        self.mod_tracker = self._Global()


def _textbook_pgd_at_step(model, optimizer, x, y, eps: float, steps: int, alpha: float) -> float:
    """The textbook PGD-AT step (Madry et al.'s code structure): the attack calls `loss.backward()`,
    computing the weight gradients too, and the loss is read with `.item()`."""
    model.train()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * x_adv.grad.sign(), x - eps), x + eps).clamp(0, 1)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def timed(loop: StepLoop, first: int, steps: int) -> float:
    """Seconds for steps first, ..., first + steps - 1 of `loop`, the device waited for."""
    if loop.device.type == "cuda":
        torch.cuda.synchronize(loop.device)
    start = time.perf_counter()
    for i in range(first, first + steps):
        loop.step(i)
    loop.finish()
    return time.perf_counter() - start


def perf_train(defense: str, model: str, model_params: dict, data: Dataset, *, batch_size: int, steps: int,
               warmup: int, rounds: int, device: torch.device, fast: FastPath, defense_params: dict | None = None,
               log: Callable[[str], None] = print) -> dict[str, LoopTiming]:
    """Time the fast and the reference loop side by side; prints the table, returns name -> timing."""
    if len(data.train_x) < batch_size:
        raise BenchError(f"--batch-size {batch_size} is larger than the {len(data.train_x)} training images")
    loops = [StepLoop("fast", defense, defense_params or {}, model, model_params, data, batch_size, device, fast),
             StepLoop("reference", defense, defense_params or {}, model, model_params, data, batch_size, device, None)]
    flops = {}
    for loop in loops:
        with fast.backends(device) if loop.fast is not None else contextlib.nullcontext():
            flops[loop.name] = loop.flops_per_image(0)
        loop.prepare()
    best = {loop.name: math.inf for loop in loops}
    peaks: dict[str, int | None] = {loop.name: None for loop in loops}
    step = 1
    for r in range(rounds + 1):  # round 0: the warm-up
        for loop in loops:
            n = warmup if r == 0 else steps
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with fast.backends(device) if loop.fast is not None else contextlib.nullcontext():
                seconds = timed(loop, step, n)
            step += n
            if r > 0:
                best[loop.name] = min(best[loop.name], seconds / n)
                if device.type == "cuda":
                    peaks[loop.name] = max(peaks[loop.name] or 0, torch.cuda.max_memory_allocated(device))
    timings = {loop.name: LoopTiming(loop.name, best[loop.name], flops[loop.name], peaks[loop.name]) for loop in loops}
    _print(timings, batch_size, device, log)
    return timings


def _print(timings: dict[str, LoopTiming], batch_size: int, device: torch.device, log) -> None:
    peak = peak_tflops(device)
    log(f"  {'loop':<10} {'img/s':>9} {'ms/step':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>7} {'peak mem':>10}")
    for t in timings.values():
        rate = batch_size / t.seconds_per_step
        achieved = t.flops_per_image * rate / 1e12
        mfu = f"{achieved / peak[1]:7.1%}" if peak else f"{'n/a':>7}"
        memory = f"{t.peak_bytes / 2 ** 30:7.2f} GiB" if t.peak_bytes is not None else f"{'n/a':>10}"
        log(f"  {t.name:<10} {rate:9.1f} {1000 * t.seconds_per_step:9.1f} {t.flops_per_image / 1e9:10.2f} "
            f"{achieved:8.3f} {mfu} {memory}")
    fast, reference = timings["fast"], timings["reference"]
    log(f"  ratio fast / reference: {reference.seconds_per_step / fast.seconds_per_step:.2f}x img/s (same run)")
    log("  MFU: model FLOPs (torch.utils.flop_counter, one step) x img/s / "
        + (f"the bf16 dense peak of {peak[0]}, {peak[1]:g} TFLOP/s" if peak else "peak unknown for this device"))
    if device.type != "cuda":
        log(f"  peak memory: process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB "
            "(both loops; per-loop figures need CUDA)")


def describe(defense: str, model: str, shape, batch_size: int, device: torch.device, fast: FastPath,
             source: str, steps: int, rounds: int, warmup: int) -> str:
    """The header: what ran, where, and how each loop is set up."""
    cuda = device.type == "cuda"
    versions = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if cuda else "")
    fast_text = " ".join(f"{k}={v}" for k, v in fast.record().items()) + (" amp=bf16" if cuda else " amp=off (CPU)")
    return (f"perf train: {defense}, {model}, {'x'.join(map(str, shape))}, batch {batch_size}, {device_name(device)}, "
            f"{versions}\n  data: {source}\n  {rounds} rounds of {steps} steps per loop after {warmup} warm-up steps; "
            f"each loop's fastest round\n  fast path: {fast_text}\n  reference: fp32, NCHW, batches copied from host "
            f"memory each step, {'weight gradients in the attack (loss.backward()), ' if defense == 'pgd_at' else ''}"
            f".item() every step, torch's default backend flags")
