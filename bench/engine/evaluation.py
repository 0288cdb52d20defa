"""Evaluations of one model (a checkpoint file, or any model: `bench.engine.subject`): an attack
(or `clean`) run over a recorded sample set, per sample, stored with provenance.
`bench.engine.stage` runs the whole evaluation stage (attacks → curves → sanity checks) with it.

An evaluation is identified by (checkpoint, attack, attack config + implementation and revision +
adversary-library revision + protocol, sample indices, seed); one that is already stored is
skipped unless `force`. Each
batch of an attack starts from the RNG state `batch_seed(seed, first index)`, so a result does
not depend on what ran before it; the batch size therefore decides the draws ("auto": sized to
the device by `auto_batch_size`, deterministically) and, with the fast path's precision, is recorded
in every evaluation's provenance. Robust accuracy under all attacks is the per-sample AND
(`Store.sample_matrix(...).worst_case()`), never the minimum of per-attack accuracies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import adversary
from bench.core.attack import ATTACKS, Attack, EvalContext
from bench.core.data import Dataset, eval_indices
from bench.core.errors import BenchError
from bench.core.models import eval_mode
from bench.core.randomness import output_changes
from bench.core.rng import batch_seed, fork_rng
from bench.core.threat import BALL_TOLERANCE, ThreatModel, perturbation_norms
from bench.engine.checkpoint import stored_path
from bench.engine.counting import count_passes
from bench.engine.fastpath import FastPath
from bench.engine.pretrained import Pretrained
from bench.engine.provenance import provenance
from bench.engine.subject import Subject
from bench.engine.trainer import train
from bench.store import Store
from bench.store.schema import EXAMPLES_PER_EVALUATION, AdversarialExample, Evaluation

CLEAN = "clean"
PROTOCOL = 2  # 2: per-batch seeding. Part of every evaluation's identity: bump it when results change.
VERDICT_DRAWS = 9   # forward passes whose plurality is a randomized model's verdict on a point
VERDICT_PROBE = 16  # evaluation samples on which the evaluator looks for randomness (`verdict_draws`)
TRACE_POINTS = 200  # a stored loss trace is thinned to at most this many points
CPU_BATCH = 256         # "auto" on the CPU
MAX_AUTO_BATCH = 2000   # "auto" on CUDA: at most this, in multiples of 100 ...
MEMORY_FRACTION = 0.4   # ... whose estimated attack memory fits in this fraction of the GPU's
ACTIVATION_FACTOR = 4   # attack memory per sample / bytes of one forward's module outputs (backward, buffers)


@dataclass(frozen=True)
class AttackSpec:
    """An attack as a suite names it: `label` (e.g. "pgd100"), registered `attack`, parameters."""

    label: str
    attack: str
    params: dict = field(default_factory=dict)

    def build(self) -> Attack:
        return ATTACKS.get(self.attack)(**self.params)


def code_identity(attack: Attack | None) -> dict:
    """What identifies an attack's evaluations besides its parameters, samples and seed: its
    implementation and revision, the adversary library's revision and the protocol (None: clean),
    and how randomized models are judged (the draws of `verdict`).
    A suite's evaluate and curves jobs hold it, so the next `bench run` recomputes what changed."""
    return {"implementation": None if attack is None else attack.implementation_id,
            "adversary": adversary.REVISION, "protocol": PROTOCOL, "randomized_verdicts": VERDICT_DRAWS}


@dataclass
class Outcome:
    label: str
    attack: str
    robust_acc: float
    n_samples: int
    forward_passes: int
    backward_passes: int
    seconds: float
    cached: bool
    evaluation_id: int


@dataclass
class FooledSample:
    """A sample an attack fooled: its position in the attacked batch sequence, clean and
    adversarial pixels, true label and adversarial prediction."""

    position: int
    clean: torch.Tensor
    adversarial: torch.Tensor
    label: int
    predicted: int


@dataclass
class AttackResult:
    """Per-sample outcome of one attack (or of `clean`) on a sample set.

    `correct`: still classified correctly (for a minimum-norm attack: no adversarial point within
    eps); `norms`: distance of the returned point (minimum-norm attacks: NaN where none was found);
    `losses`: cross-entropy at the returned point; `ever_fooled`: an observed iterate or the returned
    point was misclassified (None when the attack observes no iterates); `fooled`: the first fooled
    samples' images, as many as asked for."""

    correct: torch.Tensor
    norms: torch.Tensor | None
    losses: torch.Tensor
    ever_fooled: torch.Tensor | None
    loss_trace: list[float] | None
    forward: int
    backward: int
    seconds: float
    fooled: list[FooledSample] = field(default_factory=list)

    @property
    def silent_success(self) -> torch.Tensor | None:
        """Samples that an iterate fooled although the returned point does not (Pintor et al. 2022)."""
        return None if self.ever_fooled is None else self.ever_fooled & self.correct


@dataclass
class SampleSet:
    """A fixed, recorded evaluation subset of the test split."""

    indices: list[int]
    digest: str
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sample_digest(data: Dataset, indices: Sequence[int]) -> str:
    """The identity of a sample set: the dataset, its options and the test indices."""
    return digest([data.name, data.options, list(indices)])


def verdict_draws(model: nn.Module, data: Dataset, device: torch.device) -> int:
    """How many forward passes judge a point: 1 for a deterministic model, VERDICT_DRAWS for one
    whose outputs change between passes (`bench.core.randomness`, on the first VERDICT_PROBE
    evaluation samples). One pass of a randomized model is one draw, and the worst case is a
    per-sample AND over attacks: single-draw verdicts would make it fall with every attack added
    (digits `batch_random`: 60.0% of PGD-100's points judged once, 44.5% under the AND of ten)."""
    idx = torch.tensor(eval_indices(len(data.test_x), VERDICT_PROBE), dtype=torch.long)
    with fork_rng(device), eval_mode(model):
        return VERDICT_DRAWS if output_changes(model, data.test_x[idx].to(device)).random else 1


def verdict(model: nn.Module, x: torch.Tensor, draws: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs and predicted classes at `x`: one pass, or the plurality class of
    `draws` passes (ties to the lower class index) with their mean outputs (a randomized model's
    most likely prediction)."""
    if draws == 1:
        out = model(x)
        return out, out.argmax(1)
    outs = torch.stack([model(x) for _ in range(draws)])
    votes = F.one_hot(outs.argmax(2), outs.shape[2]).sum(0)
    return outs.mean(0), votes.argmax(1)


def run_attack(model: nn.Module, attack: Attack | None, x: torch.Tensor, y: torch.Tensor,
               batch_size: int, seed: int | None = None, keep_fooled: int = 0, draws: int = 1) -> AttackResult:
    """Per-sample results under `attack` (None: clean), with the attack's forward/backward passes
    and seconds, and the images of the first `keep_fooled` samples it fooled; with `seed`, each
    batch reseeds the global RNG (`batch_seed`); each point judged by `verdict` with `draws`. Checks every
    returned point lies in [0, 1] and (unless the attack is minimum-norm) in the eps ball: an
    attack that leaves its threat model is a bug, not a result."""
    correct, norms, losses, ever, traces, kept = [], [], [], [], [], []
    with eval_mode(model), count_passes(model) as counter:
        start = time.perf_counter()
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if seed is not None:
                torch.manual_seed(batch_seed(seed, i))
            if attack is not None:
                attack.start_trace()
                xa = attack(model, xb, yb).detach()
                trace = attack.pop_trace()
            else:
                xa, trace = xb, []
            with torch.no_grad():
                logits, predicted = verdict(model, xa, draws)
            ok = predicted == yb
            if attack is not None:
                dist = perturbation_norms(xa, xb, attack.config.norm)
                outside = dist > attack.config.eps + BALL_TOLERANCE
                if xa.min() < 0 or xa.max() > 1 or (outside.any() and not attack.minimum_norm):
                    raise BenchError(f"attack {attack.name!r} returned points outside [0, 1] or its "
                                     f"{attack.threat} ball (max distance {dist.max().item():.6g})")
                if attack.minimum_norm:
                    dist = torch.where(ok, torch.full_like(dist, float("nan")), dist)
                    ok = ok | outside
                norms.append(dist.cpu())
                if trace:
                    fooled = ~ok.clone()
                    for step in trace:
                        if step.index is None:
                            fooled |= step.fooled
                        else:
                            fooled[step.index] |= step.fooled
                    ever.append(fooled.cpu())
                    traces.append([step.loss.mean().item() for step in trace
                                   if step.index is None and step.loss is not None])
                for k in (~ok).nonzero().flatten().tolist()[:keep_fooled - len(kept)]:
                    kept.append(FooledSample(i + k, xb[k].cpu(), xa[k].cpu(), int(yb[k]), int(predicted[k])))
            correct.append(ok.cpu())
            losses.append(F.cross_entropy(logits, yb, reduction="none").cpu())
        seconds = time.perf_counter() - start
        forward, backward = counter.forward, counter.backward
    sizes = [min(batch_size, len(x) - i) for i in range(0, len(x), batch_size)]
    return AttackResult(torch.cat(correct), torch.cat(norms) if norms else None, torch.cat(losses),
                        torch.cat(ever) if len(ever) == len(sizes) and sizes else None,
                        _mean_trace(traces, sizes), forward, backward, seconds, kept)


def check_batch_size(value, what: str) -> int | str:
    """`value` when it is an integer >= 1 or "auto", else a BenchError."""
    if value != "auto" and (type(value) is not int or value < 1):
        raise BenchError(f"{what} must be an integer >= 1 or \"auto\", got {value!r}")
    return value


def auto_batch_size(model: nn.Module, input_shape, device: torch.device) -> int:
    """The evaluation batch for "auto": on the CPU 256; on CUDA the largest multiple of 100 (at most
    2,000, at least 1) whose estimated attack memory, ACTIVATION_FACTOR × the bytes of the module
    outputs of one forward pass per sample, fits in MEMORY_FRACTION of the GPU's total memory. It
    depends on the architecture and the GPU model only (never on free memory), so reruns on the
    same kind of GPU batch, and therefore seed, alike."""
    if device.type != "cuda":
        return CPU_BATCH
    outputs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel() * out.element_size()))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    per_sample = ACTIVATION_FACTOR * max(sum(outputs), 1)
    fits = int(MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory // per_sample)
    return max(1, min(MAX_AUTO_BATCH, fits // 100 * 100 or fits))


def _mean_trace(traces: list[list[float]], sizes: list[int]) -> list[float] | None:
    """The per-iterate mean loss over all samples, when every batch traced the same number of iterates."""
    if not traces or len(traces) != len(sizes) or len({len(t) for t in traces}) != 1 or not traces[0]:
        return None
    total = sum(sizes)
    return [sum(t[k] * n for t, n in zip(traces, sizes)) / total for k in range(len(traces[0]))]


def thin(values: Sequence[float], points: int = TRACE_POINTS) -> list[float]:
    """At most `points` values, evenly spaced, the last one kept."""
    if len(values) <= points:
        return list(values)
    step = (len(values) - 1) / (points - 1)
    return [values[round(k * step)] for k in range(points)]


class Evaluator:
    """Evaluations of one model (a `Subject`, or the path of a checkpoint file) on its dataset:
    finds stored ones, runs and stores new ones. Its checkpoint is registered in the store by its
    sha256 (`checkpoint_id`). `draws`: the passes that judge a point (`verdict_draws`, measured
    here unless given)."""

    def __init__(self, store: Store, subject: Subject | str | Path, data: Dataset, *, seed: int = 0,
                 batch_size: int | str = "auto", device: torch.device | str = "cpu", force: bool = False,
                 checkpoint_root: str | Path = "checkpoints", log: Callable[[str], None] = print,
                 fast: FastPath | None = None, draws: int | None = None):
        if not isinstance(subject, Subject):
            subject = Subject.from_checkpoint(subject)
        self.store, self.checkpoint, self.data, self.seed = store, subject.path, data, seed
        self.device, self.force, self.log = torch.device(device), force, log
        self.fast = FastPath.default(self.device) if fast is None else fast
        if subject.dataset != data.name:
            raise BenchError(f"checkpoint {self.checkpoint!r} was trained on {subject.dataset!r}, not {data.name!r}")
        if subject.dataset_options != data.options:
            raise BenchError(f"checkpoint {self.checkpoint!r} was trained on {data.name!r} with options "
                             f"{subject.dataset_options}, not {data.options}")
        self.model, self.threat = subject.model.to(self.device), subject.threat
        if self.fast.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.batch_size = auto_batch_size(self.model, data.input_shape, self.device) \
            if check_batch_size(batch_size, "batch_size") == "auto" else batch_size
        if draws is None:  # a worker passes the draws it measured once per checkpoint
            with self.fast.backends(self.device):
                draws = verdict_draws(self.model, data, self.device)
        self.draws = draws
        self.checkpoint_id = store.register_checkpoint(
            subject.sha256, stored_path(self.checkpoint, checkpoint_root) if Path(self.checkpoint).is_file()
            else self.checkpoint, provenance(self.device, {"checkpoint": self.checkpoint, **subject.info}, seed))
        self.pretrained = Pretrained(data, store, Path(checkpoint_root), self.device, self.threat, subject.architecture,
                                     subject.architecture_params, None, seed,
                                     trainer=functools.partial(train, fast=self.fast))
        self._prepared: set[int] = set()
        self.fresh: set[int] = set()  # ids of the evaluations this evaluator computed (reused even under force)

    def backends(self):
        """The context every model pass of this evaluator runs in: the fast path's precision and
        cudnn.benchmark (see `bench.engine.fastpath`)."""
        return self.fast.backends(self.device)

    def settings(self) -> dict:
        """What decides this evaluator's results besides the identity (provenance): batch and precision."""
        return {"batch_size": self.batch_size, "precision": self.fast.precision,
                "channels_last": self.fast.channels_last, "cudnn_benchmark": self.fast.cudnn_benchmark,
                "verdict_draws": self.draws}

    @property
    def computed(self) -> int:
        """How many evaluations this evaluator computed (the rest were found stored)."""
        return len(self.fresh)

    def reusable(self, row: Evaluation | None) -> bool:
        return row is not None and (not self.force or row.evaluation_id in self.fresh)

    def samples(self, n_samples: int | None) -> SampleSet:
        indices = eval_indices(len(self.data.test_x), n_samples)
        idx = torch.tensor(indices, dtype=torch.long)
        return SampleSet(indices, sample_digest(self.data, indices),
                         self.data.test_x[idx].to(self.device), self.data.test_y[idx].to(self.device))

    @staticmethod
    def config_hash(attack_name: str, params: dict, implementation: str, draws: int = 1) -> str:
        """The evaluation's identity besides checkpoint, samples and seed; a randomized model's
        plurality verdicts (`draws` > 1) are part of it."""
        plurality = {"verdict_draws": draws} if draws > 1 else {}
        return digest({"attack": attack_name, "params": params, "implementation": implementation,
                       "adversary": adversary.REVISION, "protocol": PROTOCOL, **plurality})

    def find(self, attack_name: str, params: dict, implementation: str, samples: SampleSet) -> Evaluation | None:
        return self.store.find_evaluation(self.checkpoint_id, attack_name,
                                          self.config_hash(attack_name, params, implementation, self.draws), samples.digest,
                                          self.seed)

    def prepare(self, attack: Attack) -> None:
        """Give the attack what it needs beyond the model (once per attack object)."""
        if id(attack) not in self._prepared:
            attack.prepare(EvalContext(self.data, self.device,
                                       self.pretrained.asked_by(f"attack {attack.name!r}", attack.pretrained_defenses)))
            self._prepared.add(id(attack))

    def evaluate(self, label: str, attack_name: str, attack: Attack | None, samples: SampleSet,
                 role: str = "attack") -> Outcome:
        """The stored evaluation of `attack` on `samples`, or a new one. A stored curve point that
        is now asked for as an attack becomes one (it is a leaderboard column from then on)."""
        params = attack.params() if attack is not None else {}
        impl = attack.implementation_id if attack is not None else "atbench"
        old = self.find(attack_name, params, impl, samples)
        if self.reusable(old):
            if role == "attack" and (old.role != "attack" or old.label != label):
                self.store.mark_attack(old.evaluation_id, label)
            return Outcome(label, attack_name, old.robust_acc, old.n_samples, old.forward_passes,
                           old.backward_passes, old.seconds, True, old.evaluation_id)
        if attack is not None:
            self.prepare(attack)
        keep = EXAMPLES_PER_EVALUATION if role == "attack" else 0
        with fork_rng(self.device), self.backends():
            result = run_attack(self.model, attack, samples.x, samples.y, self.batch_size, self.seed, keep_fooled=keep,
                                draws=self.draws)
        diagnostics = {}
        if attack is not None:
            diagnostics = _diagnostics(result, samples, attack)
        evaluation_id = self.save(label, attack_name, params, impl, result, samples, role, diagnostics,
                                  attack.threat if attack else None)
        if role == "attack":
            n = len(samples)
            self.log(f"  {label:<12} {result.correct.float().mean().item():7.2%}  ({result.forward / n:.0f} fwd, "
                     f"{result.backward / n:.0f} bwd per sample, {result.seconds:.1f}s)")
        return Outcome(label, attack_name, float(result.correct.float().mean()), len(samples), result.forward,
                       result.backward, result.seconds, False, evaluation_id)

    def save(self, label: str, attack_name: str, params: dict, implementation: str, result: AttackResult,
             samples: SampleSet, role: str, diagnostics: dict, threat: ThreatModel | None) -> int:
        """Store one result (replacing a stored one of the same identity) and return its id."""
        row = Evaluation(checkpoint_id=self.checkpoint_id, label=label, attack=attack_name,
                         norm=threat.norm if threat else None, eps=threat.eps if threat else None,
                         threat=threat.key if threat else None,
                         config_hash=self.config_hash(attack_name, params, implementation, self.draws),
                         indices_hash=samples.digest, dataset=self.data.name, n_samples=len(samples),
                         n_correct=int(result.correct.sum()), robust_acc=float(result.correct.float().mean()),
                         forward_passes=result.forward, backward_passes=result.backward, seconds=result.seconds,
                         implementation=implementation, role=role, mean_loss=_finite_mean(result.losses),
                         diagnostics=diagnostics,
                         **provenance(self.device, {"attack": attack_name, "params": params,
                                                    "checkpoint": self.checkpoint, "protocol": PROTOCOL,
                                                    "adversary": adversary.REVISION, **self.settings()}, self.seed))
        evaluation_id = self.store.save_evaluation(row, samples.indices, result.correct.tolist(),
                                                   None if result.norms is None else result.norms.tolist(),
                                                   result.losses.tolist(), _examples(result.fooled, samples))
        self.fresh.add(evaluation_id)
        return evaluation_id


def _examples(fooled: list[FooledSample], samples: SampleSet) -> list[AdversarialExample]:
    """Store rows of the fooled samples' images (float16 pixels, C×H×W)."""
    return [AdversarialExample(sample_index=samples.indices[f.position], label=f.label, predicted=f.predicted,
                               channels=f.clean.shape[0], height=f.clean.shape[1], width=f.clean.shape[2],
                               clean=f.clean.to(torch.float16).numpy().tobytes(),
                               adversarial=f.adversarial.to(torch.float16).numpy().tobytes()) for f in fooled]


def _finite_mean(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


def _diagnostics(result: AttackResult, samples: SampleSet, attack: Attack) -> dict:
    """What the sanity checks and the run page read besides per-sample correctness."""
    out: dict = {}
    if attack.stats:
        out["stats"] = attack.stats
    if result.silent_success is not None:
        silent = result.silent_success.nonzero().flatten().tolist()
        out["silent_success"] = len(silent)
        out["silent_success_indices"] = [samples.indices[i] for i in silent]
    if result.loss_trace:
        out["loss_trace"] = thin(result.loss_trace)
    if attack.minimum_norm and result.norms is not None:
        found = result.norms[torch.isfinite(result.norms)]
        out["found"] = len(found)
        if len(found):
            out["mean_norm"] = float(found.mean())
            out["median_norm"] = float(found.median())
    return out
