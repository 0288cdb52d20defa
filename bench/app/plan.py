"""A suite as a job graph, keyed by the identities the harness already has:

    train(run) ──► [plant(run, kind)] ──► evaluate(checkpoint, attack) ──┐
        ▲                              └─► curves(checkpoint) ───────────┴─► checks(checkpoint)
        │                                                         ──► adaptive(checkpoint) ──► report
        └── train(the runs a defense or an attack trains on demand: teachers, natural starts,
            static models, transfer surrogates)

A checkpoint is named by its run and kind (`best`, `last`, `planted-<kind>`): its sha256 exists
only once the run is trained. The runs a defense asks `ctx.pretrained` for are found by calling
its `setup` with a recording `Pretrained` that returns untrained models (an attack's `prepare`
likewise), so the plan knows them without training anything. The keys hold the code that makes
each result: a train job's run id hashes the defense's and the trainer's revisions, an evaluate or
curves job holds its attacks' implementation and revision (`code_identity`), a checks job the
registered checks' revisions and its inputs' keys, an adaptive job those, its checks job's key and
the remedies' revisions. A changed attack, check or remedy thus makes new jobs downstream of it,
and the next `bench run` recomputes what it changed (what did not change is found stored, by its
identity, and not recomputed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch

from bench.app.suite import Suite
from bench.core.attack import EvalContext
from bench.core.data import Dataset
from bench.core.defense import DEFENSES, TrainContext
from bench.core.models import build_model
from bench.core.threat import ThreatModel
from bench.engine.adaptive import revisions as remedy_revisions
from bench.engine.curves import code_identity as curves_identity
from bench.engine.evaluation import CLEAN, AttackSpec, code_identity
from bench.engine.pretrained import Pretrained
from bench.engine.runspec import RunSpec, build_train_config
from bench.engine.sanity import revisions as check_revisions
from bench.store import JobSpec

PRIORITY = {"train": 0, "plant": 1, "evaluate": 2, "curves": 3, "checks": 4, "adaptive": 5, "report": 6}


def run_payload(spec: RunSpec) -> dict:
    """What a train job needs to rebuild its RunSpec (JSON)."""
    return {"defense": spec.defense, "dataset": spec.dataset, "dataset_options": dict(spec.dataset_options),
            "model": spec.model, "model_params": dict(spec.model_params), "norm": spec.threat.norm,
            "eps": spec.threat.eps, "train": asdict(spec.train), "defense_params": dict(spec.defense_params),
            "seed": spec.seed, "label": spec.label,
            "pretrained_train": {name: asdict(cfg) for name, cfg in spec.pretrained_train.items()}}


def run_spec(payload: dict) -> RunSpec:
    """The inverse of `run_payload`."""
    return RunSpec(defense=payload["defense"], dataset=payload["dataset"], model=payload["model"],
                   threat=ThreatModel(payload["norm"], payload["eps"]),
                   train=build_train_config(payload["train"], f"run {payload['label'] or payload['defense']!r}"),
                   defense_params=payload["defense_params"], model_params=payload["model_params"],
                   dataset_options=payload["dataset_options"], seed=payload["seed"], label=payload["label"],
                   pretrained_train={name: build_train_config(cfg, f"pretrained {name!r}")
                                     for name, cfg in payload["pretrained_train"].items()})


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:10]


class _Recorder(Pretrained):
    """A `Pretrained` that records the runs asked for and returns untrained models of their
    architecture on its device (what a plan, or a benchmark of a training step, needs, without
    training anything)."""

    def __call__(self, defense: str = "natural", *, which: str = "best", **kwargs):
        spec = self.spec(defense, **kwargs)
        self.check_declared(defense)
        self.asked.append(spec)
        return build_model(spec.model, num_classes=self.data.num_classes, input_shape=self.data.input_shape,
                           mean=self.data.mean, std=self.data.std, **spec.model_params
                           ).to(self.device).eval().requires_grad_(False)


def stand_ins(data: Dataset, threat: ThreatModel, model: str, model_params: dict, train, seed: int,
              asker: str, declared, dependency_train=None, device: torch.device = torch.device("cpu")) -> _Recorder:
    """A `ctx.pretrained` for `asker` that records the runs asked for (`.asked`) and returns
    untrained models of their architectures on `device`."""
    recorder = _Recorder(data, None, None, device, threat, model, dict(model_params), train, seed,
                         progress=False, trainer=None, dependency_train=dict(dependency_train or {})
                         ).asked_by(asker, declared)
    recorder.asked = []
    return recorder


def pretrained_runs_of_defense(spec: RunSpec, data: Dataset) -> list[RunSpec]:
    """The runs `spec`'s defense trains on demand, found by calling its `setup`."""
    defense = DEFENSES.get(spec.defense)(**spec.defense_params)
    if not defense.pretrained_defenses:
        return []
    recorder = stand_ins(data, spec.threat, spec.model, spec.model_params, spec.train, spec.seed,
                         f"defense {spec.defense!r}", defense.pretrained_defenses, spec.pretrained_train)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, num_classes=data.num_classes, input_shape=data.input_shape, mean=data.mean,
                        std=data.std, **spec.model_params)
    ctx = TrainContext(threat=spec.threat, num_classes=data.num_classes, input_shape=data.input_shape,
                       epochs=spec.train.epochs, device=torch.device("cpu"),
                       optimizer=torch.optim.SGD(model.parameters(), lr=spec.train.lr), steps_per_epoch=1,
                       pretrained=recorder)
    defense.setup(model, ctx)
    return recorder.asked


def pretrained_runs_of_attack(attack_spec: AttackSpec, run: RunSpec, data: Dataset, seed: int) -> list[RunSpec]:
    """The runs an attack of the suite trains on demand for a checkpoint of `run`, found by calling
    its `prepare` as the evaluation does."""
    attack = attack_spec.build()
    if not attack.pretrained_defenses:
        return []
    recorder = stand_ins(data, run.threat, run.model, run.model_params, None, seed, f"attack {attack.name!r}",
                         attack.pretrained_defenses)
    attack.prepare(EvalContext(data, torch.device("cpu"), recorder))
    return recorder.asked


def plan_suite(suite: Suite, data: Dataset, reports: str | None = None) -> list[JobSpec]:
    """Every job of the suite, dependencies first; `reports`: the folder a final report job renders
    into (None: no report job). Every threat model is checked against the data first."""
    for spec in suite.runs:
        spec.threat.check_for(data.input_shape)
    for attack in suite.attacks:
        attack.build().threat.check_for(data.input_shape)
    jobs: dict[str, JobSpec] = {}

    def train_job(spec: RunSpec) -> str:
        key = f"train:{spec.run_id}"
        if key not in jobs:
            deps = tuple(train_job(dep) for dep in pretrained_runs_of_defense(spec, data))
            jobs[key] = JobSpec(key, "train", PRIORITY["train"], {"run": run_payload(spec)}, deps)
        return key

    settings = {"n_samples": suite.evaluation.n_samples, "seed": suite.evaluation.seed,
                "batch_size": suite.evaluation.batch_size}
    checks = []

    def checkpoint_jobs(run: RunSpec, kind: str, upstream: str, curves: bool) -> None:
        target = {"run_id": run.run_id, "run_label": run.label, "kind": kind, "dataset": run.dataset,
                  "dataset_options": run.dataset_options}
        evals = []
        for attack in [AttackSpec(CLEAN, CLEAN)] + suite.attacks:
            payload = {**target, **settings, "label": attack.label, "attack": attack.attack, "params": attack.params,
                       "code": code_identity(None if attack.attack == CLEAN else attack.build())}
            deps = (upstream,)
            if attack.attack != CLEAN:
                deps += tuple(train_job(dep) for dep in pretrained_runs_of_attack(attack, run, data, settings["seed"]))
            key = f"evaluate:{run.run_id}:{kind}:{attack.label}:{_digest(payload)}"
            jobs[key] = JobSpec(key, "evaluate", PRIORITY["evaluate"], payload, deps)
            evals.append(key)
        if curves:
            payload = {**target, **settings, "curves": asdict(suite.curves), "code": curves_identity(run.threat)}
            key = f"curves:{run.run_id}:{kind}:{_digest(payload)}"
            jobs[key] = JobSpec(key, "curves", PRIORITY["curves"], payload, (upstream,))
            evals.append(key)
        if suite.evaluation.sanity:
            # the checks' (and remedies') revisions are part of the jobs: a new or changed one is a new job
            # and their inputs' keys: recomputed upstream results make the checks (and remedies) run again
            payload = {**target, **settings, "checks": check_revisions(), "inputs": _digest(sorted(evals))}
            key = f"checks:{run.run_id}:{kind}:{_digest(payload)}"
            jobs[key] = JobSpec(key, "checks", PRIORITY["checks"], payload, tuple(evals))
            checks.append(key)
            if suite.adaptive is not None:
                payload = {**target, **settings, "inputs": key,  # the checks job's key holds the checks' revisions
                           "adaptive": asdict(suite.adaptive), "remedies": remedy_revisions()}
                adaptive = f"adaptive:{run.run_id}:{kind}:{_digest(payload)}"
                jobs[adaptive] = JobSpec(adaptive, "adaptive", PRIORITY["adaptive"], payload, (key,))
                checks.append(adaptive)
        checks.extend(evals)

    runs = {spec.label: spec for spec in suite.runs}
    for spec in suite.runs:
        upstream = train_job(spec)
        for kind in suite.evaluation.checkpoints:
            checkpoint_jobs(spec, kind, upstream, suite.curves is not None and kind in suite.curves.checkpoints)
    for p in suite.planted:
        run = runs[p.source]
        key = f"plant:{run.run_id}:{p.checkpoint}:{p.kind}"
        jobs[key] = JobSpec(key, "plant", PRIORITY["plant"],
                            {"run_id": run.run_id, "run_label": run.label, "from": p.checkpoint, "plant": p.kind},
                            (train_job(run),))
        checkpoint_jobs(run, f"planted-{p.kind}", key, suite.curves is not None)
    if reports is not None:
        key = f"report:{suite.name}:{reports}"
        jobs[key] = JobSpec(key, "report", PRIORITY["report"], {"out": reports}, tuple(dict.fromkeys(checks)))
    return list(jobs.values())


def describe(job) -> str:
    """A short human name of a job ("train pgd_at", "evaluate pgd_at best pgd100")."""
    p = job.payload
    if job.kind == "train":
        return f"train {p['run']['label'] or p['run']['defense']} ({p['run']['defense']}, {p['run']['model']})"
    if job.kind == "plant":
        return f"plant {p['plant']} into {p['run_label']}'s {p['from']}.pt"
    if job.kind == "report":
        return f"report into {p['out']}"
    what = f"{job.kind} {p['run_label']} {p['kind']}.pt"
    return what + (f" {p['label']}" if job.kind == "evaluate" else "")

