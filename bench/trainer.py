"""The trainer shared by every defense: data order, optimizer, LR schedule, mixed precision,
per-epoch validation under attack with best-checkpoint selection (Rice et al. 2020),
checkpoints and resume, timing, pass counting and the per-epoch log.

Determinism: each epoch reseeds the data order, augmentation and the global RNG from
(seed, epoch), and the LR is a pure function of the step, so a run resumed from the
end of epoch k reproduces the uninterrupted run exactly (on the same device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from attacks.pgd import PGD
from bench.checkpoint import STATE_FORMAT, FORMAT_VERSION, atomic_copy, atomic_save, model_checkpoint, safe_load, sha256_file
from bench.config import build_config
from bench.counting import PassCounter, count_passes
from bench.data import Dataset, augment_batch, dataset_options
from bench.defense import Defense, TrainContext, load_defenses
from bench.errors import BenchError
from bench.models import build_model, eval_mode, model_params
from bench.pretrained import Pretrained
from bench.provenance import provenance
from bench.store import Run, Store, TrainEpoch
from bench.threat import ThreatModel

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("piecewise", "cosine", "cyclic", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters shared by all defenses. Defaults: SGD, momentum 0.9,
    weight decay 5e-4, piecewise LR ×0.1 at 50% and 75% of training (Rice et al. 2020's
    CIFAR-10 recipe: lr 0.1, decays at epochs 100 and 150 of 200)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training where the LR is multiplied by gamma
    gamma: float = 0.1
    val_steps: int = 10  # PGD steps for validation robust accuracy (step eps/4, random start)
    val_samples: int | None = None  # None: the whole validation split
    amp: bool = False  # bfloat16 autocast on CUDA (ignored on CPU)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise BenchError(f"unknown optimizer {self.optimizer!r}; accepted: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise BenchError(f"unknown LR schedule {self.schedule!r}; accepted: {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise BenchError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BenchError(f"lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies a training run (its hash is the run id), plus a display label."""

    defense: str
    dataset: str
    model: str
    threat: ThreatModel
    train: TrainConfig = field(default_factory=TrainConfig)
    defense_params: dict = field(default_factory=dict)
    model_params: dict = field(default_factory=dict)
    dataset_options: dict = field(default_factory=dict)
    seed: int = 0
    label: str = ""

    def canonical(self) -> dict:
        defense = load_defenses().get(self.defense)(**self.defense_params)
        return {"defense": self.defense, "defense_params": defense.params(), "dataset": self.dataset,
                "dataset_options": dataset_options(self.dataset, self.dataset_options), "model": self.model,
                "model_params": model_params(self.model, self.model_params),
                "norm": self.threat.norm, "eps": self.threat.eps, "train": dataclasses.asdict(self.train),
                "seed": self.seed}

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_train_config(params: dict, owner: str = "training") -> TrainConfig:
    return build_config(TrainConfig, params, owner)


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimization step `step` (0-based) of `total_steps`."""
    t = step / max(total_steps, 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "piecewise":
        return cfg.lr * cfg.gamma ** sum(t >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * t))
    # cyclic (Wong et al. 2020): 0 → lr at 2/5 of training → 0
    return float(np.interp(t, [0, 0.4, 1], [0, cfg.lr, 0]))


@dataclass
class TrainResult:
    run_id: str
    directory: Path
    epochs_done: int
    trained_now: bool  # False when the run was already complete


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2 ** 63)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, attack=None) -> float:
    """Clean (or attacked) accuracy in eval mode, restoring the model's mode."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if attack is not None:
                xb = attack(model, xb, yb)
            with torch.no_grad():
                correct += (model(xb).argmax(1) == yb).sum().item()
    return correct / max(len(x), 1)


def train(spec: RunSpec, data: Dataset, *, store: Store, checkpoint_root: str | Path = "checkpoints",
          device: torch.device | str = "cpu", force: bool = False, progress: bool = True) -> TrainResult:
    """Train `spec` (or resume it, or skip it when complete) and record it in `store`."""
    device = torch.device(device)
    cfg, run_id = spec.train, spec.run_id
    directory = Path(checkpoint_root) / run_id
    state_path = directory / "state.pt"
    config = spec.canonical()

    defense: Defense = load_defenses().get(spec.defense)(**spec.defense_params)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        mean=data.mean, std=data.std, **spec.model_params).to(device)
    optimizer = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
    ctx = TrainContext(threat=spec.threat, num_classes=data.num_classes, input_shape=data.input_shape,
                       epochs=cfg.epochs, device=device,
                       optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                       pretrained=Pretrained(data, store, Path(checkpoint_root), device, spec.threat, spec.model,
                                             spec.model_params, cfg, spec.seed, progress))
    defense.setup(model, ctx)

    state = {"epoch": 0, "best_epoch": None, "best_score": -1.0, "forward": 0, "backward": 0,
             "train_seconds": 0.0, "samples": 0, "log": []}
    if state_path.exists() and not force:
        saved = safe_load(state_path, STATE_FORMAT)
        if saved["run_id"] != run_id:
            raise BenchError(f"{state_path} belongs to run {saved['run_id']}, not {run_id}; move it away to retrain")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        defense.load_state_dict(saved["defense"])
        state.update(saved["progress"])
    prov = provenance(device, config, spec.seed)
    _sync_store(store, spec, run_id, state, directory, prov)
    if state["epoch"] >= cfg.epochs:
        return TrainResult(run_id, directory, state["epoch"], trained_now=False)

    data = data.to(device)
    val_x, val_y = data.val_x[:cfg.val_samples], data.val_y[:cfg.val_samples]
    val_attack = PGD(norm=spec.threat.norm, eps=spec.threat.eps, steps=cfg.val_steps, step_size=spec.threat.eps / 4)
    counter = PassCounter(state["forward"], state["backward"])
    total_steps = steps_per_epoch * cfg.epochs
    use_amp = cfg.amp and device.type == "cuda"

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        ctx.epoch = epoch
        defense.on_epoch_start(epoch, ctx)
        generator = torch.Generator(device=device).manual_seed(_epoch_seed(spec.seed, epoch))
        torch.manual_seed(_epoch_seed(spec.seed, epoch) + 1)
        order = torch.randperm(len(data.train_x), generator=generator, device=device)
        start, loss_sum, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{spec.label or spec.defense} {epoch}/{cfg.epochs}",
                   leave=False, disable=None if progress else True)
        with count_passes(model, counter):
            for i in bar:
                idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                x = augment_batch(data.train_x[idx], data.augment, generator)
                y = data.train_y[idx]
                ctx.step = (epoch - 1) * steps_per_epoch + i
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, ctx.step, total_steps)
                model.train()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    loss = defense.training_step(model, x, y, ctx)
                if not torch.isfinite(loss):
                    _fail(store, run_id, f"loss became {loss.item()} at epoch {epoch}, step {i + 1}")
                    kept = f"the last good checkpoint (epoch {state['epoch']}) is kept in {directory}" \
                        if state["epoch"] else "no checkpoint was written"
                    raise BenchError(f"training {spec.label or spec.defense} diverged: loss became {loss.item()} at "
                                     f"epoch {epoch}, step {i + 1}; {kept}. Lower the learning rate or check the defense's parameters")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                defense.on_step_end(model, ctx)
                loss_sum += loss.item() * len(y)
                seen += len(y)
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - start
        torch.manual_seed(_epoch_seed(spec.seed, epoch) + 2)
        clean = accuracy(model, val_x, val_y, 512)
        robust = accuracy(model, val_x, val_y, 512, attack=val_attack)
        state.update(epoch=epoch, forward=counter.forward, backward=counter.backward,
                     train_seconds=state["train_seconds"] + seconds, samples=state["samples"] + seen)
        score = robust if defense.selection_metric == "robust" else clean
        improved = score > state["best_score"]
        if improved:
            state.update(best_epoch=epoch, best_score=score)
        log = {"epoch": epoch, "loss": loss_sum / seen, "clean_acc": clean, "robust_acc": robust,
               "lr": lr_at(cfg, ctx.step, total_steps), "seconds": seconds}
        state["log"] = state["log"] + [log]
        _save_epoch(directory, model, optimizer, defense, spec, run_id, state, config, improved)
        _sync_store(store, spec, run_id, state, directory, prov)
        if progress:
            print(f"  {spec.label or spec.defense} epoch {epoch}/{cfg.epochs}: loss {log['loss']:.4f}  "
                  f"val clean {clean:.1%}  val PGD-{cfg.val_steps} {robust:.1%}  {seconds:.1f}s", flush=True)
    return TrainResult(run_id, directory, state["epoch"], trained_now=True)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_epoch(directory: Path, model, optimizer, defense, spec: RunSpec, run_id: str, state: dict,
                config: dict, improved: bool) -> None:
    """last.pt, then best.pt (a byte copy, so equal checkpoints share a sha256), then state.pt:
    a kill at any point leaves a consistent, resumable set."""
    ckpt = model_checkpoint(model, run_id=run_id, epoch=state["epoch"], dataset=spec.dataset,
                            dataset_options=config["dataset_options"], norm=spec.threat.norm, eps=spec.threat.eps)
    atomic_save(ckpt, directory / "last.pt")
    if improved:
        atomic_copy(directory / "last.pt", directory / "best.pt")
    atomic_save({"format": STATE_FORMAT, "version": FORMAT_VERSION, "run_id": run_id,
                 "config": json.dumps(config, sort_keys=True, default=list),
                 "model": ckpt["state_dict"], "optimizer": optimizer.state_dict(),
                 "defense": defense.state_dict(), "progress": state}, directory / "state.pt")


def _sync_store(store: Store, spec: RunSpec, run_id: str, state: dict, directory: Path, prov: dict) -> None:
    """Write the run, its epoch log and its checkpoints as the state on disk says (so a lost or
    new database is rebuilt from the checkpoint folder)."""
    samples = state["samples"]
    with store.session() as s:
        run = s.get(Run, run_id) or Run(run_id=run_id)
        s.add(run)
        run.label = spec.label or run.label or spec.defense
        run.defense, run.dataset, run.model = spec.defense, spec.dataset, spec.model
        run.norm, run.eps, run.epochs, run.error = spec.threat.norm, spec.threat.eps, spec.train.epochs, None
        run.status = "completed" if state["epoch"] >= spec.train.epochs else "running"
        run.epochs_done, run.best_epoch, run.train_seconds = state["epoch"], state["best_epoch"], state["train_seconds"]
        run.forward_per_sample = state["forward"] / samples if samples else None
        run.backward_per_sample = state["backward"] / samples if samples else None
        for key, value in prov.items():
            setattr(run, key, value)
        rows = {r.epoch: r for r in run.epoch_rows}
        for log in state["log"]:
            row = rows.get(log["epoch"])
            if row is None:
                row = TrainEpoch(epoch=log["epoch"])
                run.epoch_rows.append(row)
            for key, value in log.items():
                setattr(row, key, value)
        for kind, epoch in (("last", state["epoch"]), ("best", state["best_epoch"])):
            path = directory / f"{kind}.pt"
            if epoch is not None and path.exists():
                store.set_checkpoint(s, run_id, kind, str(path), sha256_file(path), epoch, **prov)


def _fail(store: Store, run_id: str, message: str) -> None:
    with store.session() as s:
        run = s.get(Run, run_id)
        run.status, run.error = "failed", message
