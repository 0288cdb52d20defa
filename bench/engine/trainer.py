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

import copy
import functools
import json
import math
import os
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
from bench.engine.checkpoint import (FORMAT_VERSION, STATE_FORMAT, Writer, atomic_copy, atomic_save, check_writable,
                                     cpu_copy, model_checkpoint, safe_load, sha256_file, stored_path)
from bench.engine.counting import PassCounter, count_passes
from bench.engine.fastpath import FastPath, effective
from bench.engine.pretrained import Pretrained
from bench.engine.provenance import provenance, training_sources
from bench.engine.runspec import RunSpec, TrainConfig, TrainResult, lr_at
from bench.store import Store

STAGED_BEST = "best.pt.next"  # an improved epoch's best.pt, until state.pt records it


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
          device: torch.device | str = "cpu", force: bool = False, progress: bool = True,
          fast: FastPath | None = None) -> TrainResult:
    """Train `spec` (or resume it, or skip it when complete) and record it in `store`; `fast`: the
    fast path (default: the device's, `FastPath.default`), recorded in the run's provenance."""
    device = torch.device(device)
    fast = FastPath.default(device) if fast is None else fast
    cfg, run_id = spec.train, spec.run_id
    directory = Path(checkpoint_root) / run_id
    state_path = directory / "state.pt"
    config = spec.canonical()

    defense: Defense = DEFENSES.get(spec.defense)(**spec.defense_params)
    spec.threat.check_for(data.input_shape)
    check_writable(directory)
    sources = training_sources(type(defense))
    runs = effective(fast, defense.double_backward)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=data.num_classes, input_shape=data.input_shape,
                        mean=data.mean, std=data.std, **spec.model_params).to(device)
    fast.prepare(model, double_backward=defense.double_backward, log=print if progress else lambda _: None)
    optimizer = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(data.train_x) / cfg.batch_size)
    ctx = TrainContext(threat=spec.threat, num_classes=data.num_classes, input_shape=data.input_shape,
                       epochs=cfg.epochs, device=device,
                       optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                       pretrained=Pretrained(data, store, Path(checkpoint_root), device, spec.threat, spec.model,
                                             spec.model_params, cfg, spec.seed, progress,
                                             trainer=functools.partial(train, fast=fast),
                                             dependency_train=spec.pretrained_train)
                       .asked_by(f"defense {spec.defense!r}", defense.pretrained_defenses))
    defense.setup(model, ctx)

    state = {"epoch": 0, "best_epoch": None, "best_score": -1.0, "forward": 0, "backward": 0,
             "train_seconds": 0.0, "samples": 0, "log": []}
    hashes: dict[str, str] = {}
    if state_path.exists() and not force:
        saved = safe_load(state_path, STATE_FORMAT)
        if saved["run_id"] != run_id:
            raise BenchError(f"{state_path} belongs to run {saved['run_id']}, not {run_id}; move it away to retrain")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        defense.load_state_dict(saved["defense"])
        state.update(saved["progress"])
        recover(directory, saved)
        hashes.update(saved.get("files") or {})
        _check_resumable(spec, saved, sources, directory, complete=state["epoch"] >= cfg.epochs, log=progress)
    prov = provenance(device, {**config, "fast_path": runs.record()}, spec.seed)
    _sync_store(store, spec, run_id, state, directory, prov)
    if state["epoch"] >= cfg.epochs:
        return TrainResult(run_id, directory, state["epoch"], trained_now=False)

    data = data.to(device)
    val_x, val_y = data.val_x[:cfg.val_samples], data.val_y[:cfg.val_samples]
    val_attack = validation_attack(spec.threat, cfg.val_steps)
    counter = PassCounter(state["forward"], state["backward"])
    total_steps = steps_per_epoch * cfg.epochs
    use_amp = cfg.amp and device.type == "cuda"
    writer = Writer(fast.background_checkpoints)
    name = spec.label or spec.defense

    try:
        with fast.backends(device):
            for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
                ctx.epoch = epoch
                defense.on_epoch_start(epoch, ctx)
                generator = torch.Generator(device=device).manual_seed(epoch_seed(spec.seed, epoch))
                torch.manual_seed(epoch_seed(spec.seed, epoch) + 1)
                order = torch.randperm(len(data.train_x), generator=generator, device=device)
                start, monitor = time.perf_counter(), LossMonitor(device)
                bar = tqdm(range(steps_per_epoch), desc=f"{name} {epoch}/{cfg.epochs}",
                           leave=False, disable=None if progress else True)
                with count_passes(model, counter):
                    try:
                        for i in bar:
                            x, y = training_batch(data, order, i, cfg.batch_size, generator)
                            ctx.step = (epoch - 1) * steps_per_epoch + i
                            for group in optimizer.param_groups:
                                group["lr"] = lr_at(cfg, ctx.step, total_steps)
                            monitor.add(optimization_step(model, defense, x, y, ctx, optimizer, use_amp), len(y), i)
                            if (i + 1) % fast.sync_every == 0 or i + 1 == steps_per_epoch:
                                monitor.check()
                                bar.set_postfix(loss=f"{monitor.last:.3f}", refresh=False)
                    except Exception as exc:  # a defense failing on the weights a non-finite loss left
                        if isinstance(exc, _Diverged) or monitor.diverged() is None:
                            raise
                        monitor.check()
                seconds = time.perf_counter() - start
                torch.manual_seed(epoch_seed(spec.seed, epoch) + 2)
                clean = accuracy(model, val_x, val_y, 512)
                robust = accuracy(model, val_x, val_y, 512, attack=val_attack)
                state.update(epoch=epoch, forward=counter.forward, backward=counter.backward,
                             train_seconds=state["train_seconds"] + seconds, samples=state["samples"] + monitor.samples)
                score = robust if defense.selection_metric == "robust" else clean
                improved = score > state["best_score"]
                if improved:
                    state.update(best_epoch=epoch, best_score=score)
                log = {"epoch": epoch, "loss": monitor.mean(), "clean_acc": clean, "robust_acc": robust,
                       "lr": lr_at(cfg, ctx.step, total_steps), "seconds": seconds}
                state["log"] = state["log"] + [log]
                snapshot = _snapshot(model, optimizer, defense, spec, run_id, state, config)
                writer.submit(functools.partial(_write_epoch, directory, snapshot, run_id, config, improved, sources,
                                                hashes, store, spec, prov))
                if progress:
                    print(f"  {name} epoch {epoch}/{cfg.epochs}: loss {log['loss']:.4f}  "
                          f"val clean {clean:.1%}  val PGD-{cfg.val_steps} {robust:.1%}  {seconds:.1f}s", flush=True)
    except _Diverged as bad:
        writer.wait()  # the last good epoch's files and rows first
        store.fail_run(run_id, f"loss became {bad.value} at epoch {ctx.epoch}, step {bad.step + 1}")
        kept = f"the last good checkpoint (epoch {state['epoch']}) is kept in {directory}" \
            if state["epoch"] else "no checkpoint was written"
        raise BenchError(f"training {name} diverged: loss became {bad.value} at epoch {ctx.epoch}, step {bad.step + 1}; "
                         f"{kept}. Lower the learning rate or check the defense's parameters") from None
    except BaseException:
        writer.wait(raise_error=False)  # the write in flight finishes; the original error is the one raised
        raise
    writer.wait()
    return TrainResult(run_id, directory, state["epoch"], trained_now=True)


def training_batch(data: Dataset, order: torch.Tensor, i: int, batch_size: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `i` of an epoch's `order`, augmented on the data's device."""
    idx = order[i * batch_size:(i + 1) * batch_size]
    return augment_batch(data.train_x[idx], data.augment, generator), data.train_y[idx]


def optimization_step(model: nn.Module, defense: Defense, x: torch.Tensor, y: torch.Tensor, ctx: TrainContext,
                      optimizer: torch.optim.Optimizer, amp: bool) -> torch.Tensor:
    """One step of `defense`: its loss in train mode (bf16 autocast with `amp`), backward, the
    optimizer step, `on_step_end`. Returns the loss, on the device (reading it would wait for it)."""
    model.train()
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = defense.training_step(model, x, y, ctx)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    defense.on_step_end(model, ctx)
    return loss


class _Diverged(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(step, value)
        self.step, self.value = step, value


class LossMonitor:
    """An epoch's loss sum (float64, as a Python float would sum it) and its first non-finite loss,
    kept on the device: reading them (`check`, `mean`) is the only host-device sync, so the
    training loop need not wait for the GPU at every step."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), device=device)
        self.latest = self.total
        self.samples = 0

    def add(self, loss: torch.Tensor, n: int, step: int) -> None:
        loss = loss.detach()
        self.total += loss.double() * n
        first = (self.bad_step < 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_value = torch.where(first, loss.float(), self.bad_value)
        self.latest, self.samples = loss, self.samples + n

    def diverged(self) -> tuple[int, float] | None:
        """(step, loss) of the first non-finite loss so far, or None."""
        step = int(self.bad_step)
        return None if step < 0 else (step, float(self.bad_value))

    def check(self) -> None:
        """Raise `_Diverged` when a loss so far was not finite."""
        bad = self.diverged()
        if bad is not None:
            raise _Diverged(*bad)

    @property
    def last(self) -> float:
        return float(self.latest)

    def mean(self) -> float:
        return float(self.total) / self.samples


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _snapshot(model, optimizer, defense, spec: RunSpec, run_id: str, state: dict, config: dict) -> dict:
    """CPU copies of what the epoch's files hold, taken now: training goes on changing the originals
    while a background writer saves them."""
    return {"checkpoint": model_checkpoint(model, run_id=run_id, epoch=state["epoch"], dataset=spec.dataset,
                                           dataset_options=config["dataset_options"], norm=spec.threat.norm,
                                           eps=spec.threat.eps),
            "optimizer": cpu_copy(optimizer.state_dict()), "defense": cpu_copy(defense.state_dict()),
            "progress": copy.deepcopy(state)}


def _write_epoch(directory: Path, snapshot: dict, run_id: str, config: dict, improved: bool, sources: dict,
                 hashes: dict, store: Store, spec: RunSpec, prov: dict) -> None:
    """last.pt; then, when the epoch improved, best.pt staged as best.pt.next (a byte copy, so equal
    checkpoints share a sha256); then state.pt with both files' sha256 (the commit point); then
    the staged file moved in place; then the store. Each file's sha256 is computed once, as it is
    written (`hashes`, updated). A kill at any point leaves a consistent, resumable set: `recover`
    moves in a staged best.pt that state.pt records and drops one it does not."""
    ckpt = snapshot["checkpoint"]
    hashes["last"] = atomic_save(ckpt, directory / "last.pt", digest=True)
    if improved:
        atomic_copy(directory / "last.pt", directory / STAGED_BEST)
        hashes["best"] = hashes["last"]
    atomic_save({"format": STATE_FORMAT, "version": FORMAT_VERSION, "run_id": run_id,
                 "config": json.dumps(config, sort_keys=True, default=list),
                 "model": ckpt["state_dict"], "optimizer": snapshot["optimizer"],
                 "defense": snapshot["defense"], "progress": snapshot["progress"], "files": dict(hashes),
                 "sources": sources},
                directory / "state.pt")
    if improved:
        os.replace(directory / STAGED_BEST, directory / "best.pt")
    _sync_store(store, spec, run_id, snapshot["progress"], directory, prov, hashes)


def recover(directory: Path, saved: dict) -> None:
    """Finish the writes of an epoch a kill interrupted: a staged best.pt that state.pt records is
    moved in place, one it does not record (written before the kill reached state.pt) removed. Only
    the trainer of the run calls it (a worker holding its job's lease): a concurrent writer's staged
    file is never touched."""
    staged = directory / STAGED_BEST
    if staged.exists():
        if sha256_file(staged) == (saved.get("files") or {}).get("best"):
            os.replace(staged, directory / "best.pt")
        else:
            staged.unlink()


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
    """BenchError unless each file is the one state.pt records (a best.pt it records may still be
    staged: `recover` moves it in place when the run is next trained)."""
    for kind, digest in (saved.get("files") or {}).items():
        path = directory / f"{kind}.pt"
        if kind == "best" and (directory / STAGED_BEST).exists() and sha256_file(directory / STAGED_BEST) == digest:
            continue
        actual = sha256_file(path) if path.exists() else "missing"
        if actual != digest:
            raise BenchError(f"{path} has sha256 {actual[:16]}, but training wrote {digest[:16]}: the file changed "
                             "after training; restore it, or retrain the run with --force")


def verify_checkpoints(spec: RunSpec, checkpoint_root: str | Path) -> None:
    """BenchError when a complete run's best.pt or last.pt is not the file its training wrote (a
    check before any work, changing nothing; a run not trained yet, or still training, passes)."""
    state_path = Path(checkpoint_root) / spec.run_id / "state.pt"
    if state_path.exists():
        saved = safe_load(state_path, STATE_FORMAT)
        if saved["progress"]["epoch"] >= spec.train.epochs:
            _check_files(saved, state_path.parent)


def _sync_store(store: Store, spec: RunSpec, run_id: str, state: dict, directory: Path, prov: dict,
                hashes: dict | None = None) -> None:
    """Write the run, its epoch log and its checkpoints as the state on disk says (so a lost or
    new database is rebuilt from the checkpoint folder); `hashes`: the files' sha256 when known."""
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
            sha = hashes[kind] if hashes and kind in hashes else sha256_file(path)
            checkpoints[kind] = (stored_path(path, directory.parent), sha, epoch)
    store.sync_run(run_id, fields, state["log"], checkpoints, prov)
