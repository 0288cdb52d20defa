"""The trainer shared by every defense: data order, optimizer, LR schedule, mixed precision,
per-epoch validation under attack with best-checkpoint selection (Rice et al. 2020),
checkpoints and resume, timing, pass counting and the per-epoch log.

Determinism: each epoch reseeds the data order, augmentation and the global RNG from
(seed, epoch), and the LR is a pure function of the step, so a run resumed from the
end of epoch k reproduces the uninterrupted run exactly on the same device, torch version, CPU
instruction set and thread count (all recorded in the run's provenance).

Nothing stale or mixed: `state.pt` records the sha256 of `last.pt` and `best.pt` and digests of
the code the weights depend on (the defense's module, the adversary library, this loop). A run
trained by other code is not resumed (that would mix epochs of two versions) and a complete run
whose checkpoint files changed after training is refused with both hashes, never re-pointed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from bench.adversary.ball import random_start
from bench.adversary.losses import ce_loss
from bench.adversary.pgd import pgd
from bench.core.data import Dataset, augment_batch
from bench.core.defense import DEFENSES, Defense, TrainContext
from bench.core.errors import BenchError
from bench.core.models import build_model, eval_mode
from bench.core.rng import epoch_seed
from bench.core.threat import ThreatModel
from bench.engine.checkpoint import (FORMAT_VERSION, STATE_FORMAT, atomic_copy, atomic_save, check_writable,
                                     model_checkpoint, safe_load, sha256_file, stored_path)
from bench.engine.counting import PassCounter, count_passes
from bench.engine.pretrained import Pretrained
from bench.engine.provenance import provenance, training_sources
from bench.engine.runspec import RunSpec, TrainConfig, TrainResult, lr_at
from bench.store import Store


def validation_attack(threat: ThreatModel, steps: int) -> Callable:
    """The validation adversary that picks best.pt: PGD-`steps` on the cross-entropy with step
    eps/4 from a uniform random start (Rice et al. 2020's early stopping)."""
    def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd(model, x, lambda logits: ce_loss(logits, y), eps=threat.eps, norm=threat.norm, steps=steps,
                   step_size=threat.eps / 4, x_init=random_start(x, threat.norm, threat.eps))

    return attack


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

    defense: Defense = DEFENSES.get(spec.defense)(**spec.defense_params)
    spec.threat.check_for(data.input_shape)
    check_writable(directory)
    sources = training_sources(type(defense))
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        mean=data.mean, std=data.std, **spec.model_params).to(device)
    optimizer = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
    ctx = TrainContext(threat=spec.threat, num_classes=data.num_classes, input_shape=data.input_shape,
                       epochs=cfg.epochs, device=device,
                       optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                       pretrained=Pretrained(data, store, Path(checkpoint_root), device, spec.threat, spec.model,
                                             spec.model_params, cfg, spec.seed, progress, trainer=train,
                                             dependency_train=spec.pretrained_train)
                       .asked_by(f"defense {spec.defense!r}", defense.pretrained_defenses))
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
        _check_resumable(spec, saved, sources, directory, complete=state["epoch"] >= cfg.epochs, log=progress)
    prov = provenance(device, config, spec.seed)
    _sync_store(store, spec, run_id, state, directory, prov)
    if state["epoch"] >= cfg.epochs:
        return TrainResult(run_id, directory, state["epoch"], trained_now=False)

    data = data.to(device)
    val_x, val_y = data.val_x[:cfg.val_samples], data.val_y[:cfg.val_samples]
    val_attack = validation_attack(spec.threat, cfg.val_steps)
    counter = PassCounter(state["forward"], state["backward"])
    total_steps = steps_per_epoch * cfg.epochs
    use_amp = cfg.amp and device.type == "cuda"

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        ctx.epoch = epoch
        defense.on_epoch_start(epoch, ctx)
        generator = torch.Generator(device=device).manual_seed(epoch_seed(spec.seed, epoch))
        torch.manual_seed(epoch_seed(spec.seed, epoch) + 1)
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
                    store.fail_run(run_id, f"loss became {loss.item()} at epoch {epoch}, step {i + 1}")
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
        torch.manual_seed(epoch_seed(spec.seed, epoch) + 2)
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
        _save_epoch(directory, model, optimizer, defense, spec, run_id, state, config, improved, sources)
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
                config: dict, improved: bool, sources: dict) -> None:
    """last.pt, then best.pt (a byte copy, so equal checkpoints share a sha256), then state.pt
    with their hashes: a kill at any point leaves a consistent, resumable set."""
    ckpt = model_checkpoint(model, run_id=run_id, epoch=state["epoch"], dataset=spec.dataset,
                            dataset_options=config["dataset_options"], norm=spec.threat.norm, eps=spec.threat.eps)
    atomic_save(ckpt, directory / "last.pt")
    if improved:
        atomic_copy(directory / "last.pt", directory / "best.pt")
    files = {kind: sha256_file(directory / f"{kind}.pt") for kind in ("last", "best")}
    atomic_save({"format": STATE_FORMAT, "version": FORMAT_VERSION, "run_id": run_id,
                 "config": json.dumps(config, sort_keys=True, default=list),
                 "model": ckpt["state_dict"], "optimizer": optimizer.state_dict(),
                 "defense": defense.state_dict(), "progress": state, "files": files, "sources": sources},
                directory / "state.pt")


def _check_resumable(spec: RunSpec, saved: dict, sources: dict, directory: Path, *, complete: bool,
                     log: bool) -> None:
    """Refuse to resume a run whose epochs so far were trained by other code, and a complete run
    whose checkpoint files are not the ones training wrote; warn when a complete run was trained by
    other code under the same revisions (its results are kept: the revisions say they stand)."""
    changed = [part for part, digest in (saved.get("sources") or {}).items() if sources.get(part) != digest]
    name = spec.label or spec.defense
    if changed and not complete:
        raise BenchError(f"run {spec.run_id} ({name}) was trained up to epoch {saved['progress']['epoch']} by other "
                         f"code ({', '.join(changed)} changed since): resuming would mix epochs of two versions; bump "
                         "the revision if results change (a new run), or retrain it with --force")
    if changed and log:
        print(f"  warning: {name}: the code of its {', '.join(changed)} changed since it was trained, under the same "
              "revisions; its results are kept (bump the revision if they can change)", flush=True)
    if complete:
        _check_files(saved, directory)


def _check_files(saved: dict, directory: Path) -> None:
    for kind, digest in (saved.get("files") or {}).items():
        path = directory / f"{kind}.pt"
        actual = sha256_file(path) if path.exists() else "missing"
        if actual != digest:
            raise BenchError(f"{path} has sha256 {actual[:16]}, but training wrote {digest[:16]}: the file changed "
                             "after training; restore it, or retrain the run with --force")


def verify_checkpoints(spec: RunSpec, checkpoint_root: str | Path) -> None:
    """BenchError when a complete run's best.pt or last.pt is not the file its training wrote (a
    check before any work; a run not trained yet, or still training, passes)."""
    state_path = Path(checkpoint_root) / spec.run_id / "state.pt"
    if state_path.exists():
        saved = safe_load(state_path, STATE_FORMAT)
        if saved["progress"]["epoch"] >= spec.train.epochs:
            _check_files(saved, state_path.parent)


def _sync_store(store: Store, spec: RunSpec, run_id: str, state: dict, directory: Path, prov: dict) -> None:
    """Write the run, its epoch log and its checkpoints as the state on disk says (so a lost or
    new database is rebuilt from the checkpoint folder)."""
    samples = state["samples"]
    fields = {"label": spec.label, "defense": spec.defense, "dataset": spec.dataset,
              "model": spec.model, "norm": spec.threat.norm, "eps": spec.threat.eps, "epochs": spec.train.epochs,
              "error": None, "status": "completed" if state["epoch"] >= spec.train.epochs else "running",
              "epochs_done": state["epoch"], "best_epoch": state["best_epoch"],
              "train_seconds": state["train_seconds"],
              "forward_per_sample": state["forward"] / samples if samples else None,
              "backward_per_sample": state["backward"] / samples if samples else None}
    checkpoints = {}
    for kind, epoch in (("last", state["epoch"]), ("best", state["best_epoch"])):
        path = directory / f"{kind}.pt"
        if epoch is not None and path.exists():
            checkpoints[kind] = (stored_path(path, directory.parent), sha256_file(path), epoch)
    store.sync_run(run_id, fields, state["log"], checkpoints, prov)
