"""Command line: `python -m bench list | train | eval | run | perf | export | report`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.app.api import DEFAULT_ATTACKS, parse_attack, pick_device
from bench.core.errors import BenchError


def _fast(args, device: torch.device):
    """The fast path on `device` with the `--fast KEY=VALUE` overrides (checked now, before any work)."""
    from bench.core.config import parse_assignments
    from bench.engine.fastpath import FastPath

    return FastPath.default(device, parse_assignments(getattr(args, "fast", None)))


class Parser(argparse.ArgumentParser):
    """argparse with every error on one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def count(minimum: int):
    """An argparse type: an integer >= `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=count(1), default=1,
                   help="worker processes (default 1; on a GPU box `--workers N` takes one GPU each)")
    p.add_argument("--threads", type=count(1), default=None,
                   help="intra-op CPU threads per worker (default: the cores divided among local workers); results "
                        "are bit-identical across worker counts for the same --threads")
    p.add_argument("--backend", default="local", choices=["local", "ray", "slurm"],
                   help="where the workers run: local processes, Ray tasks, or a Slurm array (submitit)")
    p.add_argument("--lease", type=float, default=60.0, help="seconds a job stays claimed without a heartbeat")
    p.add_argument("--ray-address", default=None, help="a Ray cluster's address (default: a local Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0, help="Ray: GPUs per worker task (fractions share a GPU)")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-time", type=count(1), default=24 * 60, help="Slurm time limit per worker, minutes")
    p.add_argument("--slurm-account", default=None)
    p.add_argument("--slurm-gres", default="gpu:1")
    p.add_argument("--slurm-folder", default="slurm_logs", help="submitit's folder for job files and logs")


def batch_size(text: str) -> int | str:
    """An argparse type: an integer >= 1 or "auto"."""
    return text if text == "auto" else count(1)(text)


def _fast_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="append", metavar="KEY=VALUE",
                   help="fast-path option (repeatable): precision=fp32|tf32, channels_last, cudnn_benchmark, "
                        "sync_every=N, compile, background_checkpoints (=true|false); default: on for CUDA "
                        "(tf32, no compile), off on the CPU; recorded in provenance")


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--db", default="results.db", help="SQLite file or SQLAlchemy URL (default: results.db)")
    if data:
        p.add_argument("--data-dir", default=None, help="folder holding dataset files (offline use)")
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
        p.add_argument("--force", action="store_true", help="redo work that is already stored")
        _fast_option(p)


def parse_remedies(items: list[str] | None) -> dict:
    """`--remedy NAME:k=v,...` options as {remedy name: parameters}."""
    from bench.core.config import parse_assignments

    out: dict = {}
    for item in items or []:
        name, _, rest = item.partition(":")
        out.setdefault(name.strip(), {}).update(parse_assignments([a for a in rest.split(",") if a]))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bench", description="Train and evaluate adversarial-training defenses; "
                                     "store per-sample results in SQLite; render a static HTML leaderboard.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("list", help="list registered defenses, attacks, models, datasets and remedies")
    p.add_argument("kind", nargs="?", choices=["defenses", "attacks", "models", "datasets", "remedies"])

    p = sub.add_parser("train", help="train one defense")
    p.add_argument("--defense", required=True)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--norm", default=None, help="Linf or L2 (default: the dataset's)")
    p.add_argument("--eps", default=None, help="training eps, a number or a fraction like 8/255 (default: the dataset's)")
    p.add_argument("--epochs", type=count(1), default=None)
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--label", default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="defense parameter (repeatable)")
    p.add_argument("--train", action="append", metavar="KEY=VALUE", help="training parameter, e.g. lr=0.05 (repeatable)")
    p.add_argument("--model-param", action="append", metavar="KEY=VALUE", help="model parameter (repeatable)")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE",
                   help="dataset option, e.g. n_train=512 for synthetic (repeatable)")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint folder (default: checkpoints)")
    _common(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint, or any model, with attacks")
    p.add_argument("checkpoint", nargs="?", help="an atbench model checkpoint (best.pt, last.pt); or give --model "
                   "or --robustbench")
    p.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="a model defined outside atbench: the function or "
                   "class that builds it (importable from here), called with the --model-arg values")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="argument of the factory (repeatable)")
    p.add_argument("--weights", metavar="FILE", help="weights of --model: a torch.save file holding its state dict, "
                   "read with weights_only=True (no code in it runs)")
    p.add_argument("--robustbench", metavar="NAME", help="a RobustBench model zoo entry, e.g. Standard "
                   "(needs pip install 'atbench[robustbench]')")
    p.add_argument("--model-dir", default="models", help="where RobustBench weights are kept: DIR/DATASET/NORM/NAME.pt "
                   "(default: models)")
    p.add_argument("--name", help="the model's name in the store and the report (default: the factory with its "
                   "arguments, or the RobustBench name); with its weights it identifies the model")
    p.add_argument("--dataset", help="dataset of --model or --robustbench")
    p.add_argument("--norm", default=None, help="threat model of --model or --robustbench: Linf or L2 "
                   "(default: the dataset's)")
    p.add_argument("--eps", default=None, help="its eps, a number or a fraction like 8/255 (default: the dataset's)")
    p.add_argument("--normalize", metavar="MEAN,STD", help="--model expects normalized inputs: mean and std (one "
                   "number each, or one per channel: the means, then the stds); eps stays in pixel units")
    p.add_argument("--attack", action="append", metavar="[LABEL=]NAME[:k=v,...]",
                   help=f"attack to run (repeatable; default: {' '.join(DEFAULT_ATTACKS)}); norm and eps default to the "
                   "checkpoint's")
    p.add_argument("--n-samples", type=count(1), default=None, help="size of the fixed evaluation subset (default: whole test set)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--batch-size", type=batch_size, default="auto",
                   help="samples per batch, each batch seeded from its first index (default: auto, sized to the device)")
    p.add_argument("--no-curves", action="store_true", help="skip the curves (accuracy/loss vs eps, steps, restarts)")
    p.add_argument("--curve-samples", type=count(1), default=200, help="samples the curves use (default: 200)")
    p.add_argument("--no-sanity", action="store_true", help="skip the sanity checks (and so the adaptive stage)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="skip the adaptive stage (the remedies of the failed checks: EOT, BPDA, logit recovery, ...)")
    p.add_argument("--adaptive-warned", action="store_true", help="remedy the warned checks too, not only the failed")
    p.add_argument("--remedy", action="append", metavar="NAME:k=v,...",
                   help="a remedy's budgets, e.g. eot:max_k=10 or square:queries=5000 (repeatable)")
    p.add_argument("--checkpoints", default="checkpoints", help="where runs an attack needs (a surrogate) are kept")
    _common(p)

    p = sub.add_parser("run", help="train and evaluate a suite (its job graph, with 1 or more workers), then render the report")
    p.add_argument("--suite", required=True, help="suite TOML file, e.g. suites/demo.toml")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint root, shared by every worker (default: checkpoints)")
    p.add_argument("--reports", default="reports", help="report folder (default: reports)")
    p.add_argument("--no-report", action="store_true")
    _workers(p)
    _common(p)

    p = sub.add_parser("plan", help="print a suite's jobs, their dependencies and states")
    p.add_argument("--suite", required=True)
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--reports", default="reports")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON object per job, for tools")
    p.add_argument("--db", default="results.db", help="SQLite file or SQLAlchemy URL (default: results.db)")
    p.add_argument("--data-dir", default=None, help="folder holding dataset files (offline use)")

    p = sub.add_parser("worker", help="run jobs from the store until none is left (start any number, on any host)")
    p.add_argument("--checkpoints", default="checkpoints", help="checkpoint root (a shared filesystem across hosts)")
    p.add_argument("--threads", type=count(1), default=None, help="intra-op CPU threads (default: torch's)")
    p.add_argument("--lease", type=float, default=60.0, help="seconds a job stays claimed without a heartbeat (default: 60)")
    _common(p)

    p = sub.add_parser("perf", help="benchmarks that print figures")
    what = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    q = what.add_parser("train", help="img/s of one defense's training step: the fast path next to the textbook "
                                      "loop, in the same run")
    q.add_argument("--defense", default="pgd_at")
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="defense parameter (repeatable)")
    q.add_argument("--model", default="preact_resnet18")
    q.add_argument("--model-param", action="append", metavar="KEY=VALUE", help="model parameter (repeatable)")
    q.add_argument("--shape", default="3x32x32", help="input shape CxHxW (default: CIFAR's 3x32x32)")
    q.add_argument("--batch-size", type=count(1), default=None, help="default: 128 on CUDA, 16 on the CPU")
    q.add_argument("--steps", type=count(1), default=None, help="timed steps per round (default: 20 on CUDA, 2 on the CPU)")
    q.add_argument("--rounds", type=count(1), default=None, help="alternating rounds per loop, the fastest kept "
                   "(default: 3 on CUDA, 2 on the CPU)")
    q.add_argument("--warmup", type=count(0), default=None, help="untimed steps per loop first (default: 5 on CUDA, "
                   "1 on the CPU)")
    q.add_argument("--data-dir", default=None, help="where CIFAR-10 is (used when present, never downloaded)")
    q.add_argument("--device", default=None)
    _fast_option(q)
    q = what.add_parser("eval", help="seconds and passes per attack, side by side with torchattacks")
    q.add_argument("--checkpoint", default=None, help="model checkpoint (default: a PGD-trained small CNN on digits, "
                   "trained once into --checkpoints)")
    q.add_argument("--attack", action="append", metavar="[LABEL=]NAME[:k=v,...]",
                   help="attack to time (repeatable; default: all that torchattacks also has; parameters only with "
                        "--against fp32 or none)")
    q.add_argument("--against", default="torchattacks", choices=["torchattacks", "fp32", "none"],
                   help="what ours is timed against: torchattacks' equivalent, our fp32 reference path (speed-up and "
                        "per-sample agreement), or nothing")
    q.add_argument("--model", default=None, help="time on this architecture trained --train-epochs epochs of PGD-AT at "
                   "--shape (instead of the digits model)")
    q.add_argument("--model-param", action="append", metavar="KEY=VALUE", help="model parameter (repeatable)")
    q.add_argument("--shape", default=None, help="input shape CxHxW for --model (default 3x32x32)")
    q.add_argument("--train-epochs", type=count(1), default=1, help="epochs of PGD-AT for --model (default: 1)")
    q.add_argument("--batch-size", type=batch_size, default="auto", help="batch of --against fp32/none (default: auto)")
    q.add_argument("--n-samples", type=count(1), default=256, help="test samples attacked (default: 256)")
    q.add_argument("--repeats", type=count(1), default=3, help="runs of each attack; the fastest is shown (default: 3)")
    q.add_argument("--checkpoints", default="checkpoints")
    q.add_argument("--data-dir", default=None)
    q.add_argument("--device", default=None)
    q.add_argument("--db", default="results.db")
    _fast_option(q)

    p = sub.add_parser("export", help="write the leaderboard in another benchmark's format")
    p.add_argument("--robustbench", required=True, metavar="DIR", help="one RobustBench model_info JSON per "
                   "leaderboard row, as DIR/DATASET/NORM/NAME.json")
    _common(p, data=False)

    p = sub.add_parser("report", help="render the HTML leaderboard from the store")
    p.add_argument("--out", default="reports")
    p.add_argument("--claims", default=None, metavar="DIR",
                   help="folder of RobustBench model-info JSONs (model_info/<dataset>/<Linf|L2>/<id>.json) to show as "
                        "claims besides the seed papers' (default: ./claims when it exists)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="also write the page comparing two runs sample by sample (run id, unique prefix or label; "
                        "RUN:last for the last checkpoint)")
    _common(p, data=False)
    return parser


def cmd_list(args) -> None:
    from bench.core.attack import ATTACKS
    from bench.core.data import DATASETS
    from bench.core.defense import DEFENSES
    from bench.core.models import MODELS
    from bench.core.remedy import REMEDIES

    registries = {"defenses": DEFENSES, "attacks": ATTACKS, "models": MODELS, "datasets": DATASETS,
                  "remedies": REMEDIES}
    for kind, registry in registries.items():
        if args.kind in (None, kind):
            print(f"{kind}: {', '.join(registry.names())}")


def cmd_train(args) -> None:
    from bench.core.config import parse_assignments
    from bench.core.data import load_dataset
    from bench.core.threat import ThreatModel, parse_eps
    from bench.engine.runspec import RunSpec, build_train_config
    from bench.engine.trainer import train
    from bench.store import Store

    dataset_options = parse_assignments(args.dataset_option)
    data = load_dataset(args.dataset, data_dir=args.data_dir, **dataset_options)
    norm = args.norm or data.default_threat.norm
    eps = parse_eps(args.eps, "--eps") if args.eps is not None else data.default_threat.eps
    train_params = parse_assignments(args.train)
    if args.epochs is not None:
        train_params["epochs"] = args.epochs
    spec = RunSpec(defense=args.defense, dataset=args.dataset, model=args.model, threat=ThreatModel(norm, eps),
                   train=build_train_config(train_params), defense_params=parse_assignments(args.set),
                   model_params=parse_assignments(args.model_param), dataset_options=dataset_options, seed=args.seed,
                   label=args.label or args.defense)
    spec.canonical()
    device = pick_device(args.device)
    fast = _fast(args, device)
    result = train(spec, data, store=Store(args.db), checkpoint_root=args.checkpoints, device=device,
                   force=args.force, fast=fast)
    state = "trained" if result.trained_now else "already trained (use --force to retrain)"
    print(f"run {result.run_id} {state}: checkpoints in {result.directory}/ (best.pt, last.pt)")


def cmd_eval(args) -> None:
    from bench.app.api import attack_specs, curve_settings, run_evaluation
    from bench.core.data import load_dataset
    from bench.engine.adaptive import adaptive_settings
    from bench.store import Store

    subject, data = _eval_subject(args)
    what = "the checkpoint" if args.checkpoint else "the model"
    specs = attack_specs(args.attack, subject.threat, what)
    curves = None if args.no_curves else curve_settings(args.curve_samples)
    adaptive = None if args.no_adaptive or args.no_sanity else adaptive_settings(
        {"warned": args.adaptive_warned, **parse_remedies(args.remedy)}, "--remedy")
    data = data or load_dataset(subject.dataset, data_dir=args.data_dir, **subject.dataset_options)
    device = pick_device(args.device)
    fast = _fast(args, device)
    store = Store(args.db)  # opened only once the input is known to be good
    if args.checkpoint:
        print(f"evaluating {args.checkpoint} ({subject.dataset}, trained for {subject.threat})")
    else:
        print(f"evaluating {subject.info['name']} ({subject.dataset}, {subject.threat}; sha256 {subject.sha256[:12]})")
    result = run_evaluation(store, subject, data, specs, n_samples=args.n_samples, seed=args.seed,
                            batch_size=args.batch_size, device=device, force=args.force, curves=curves,
                            sanity=not args.no_sanity, adaptive=adaptive, checkpoint_root=args.checkpoints,
                            fast=fast)
    print(f"  {'worst case':<12} {result.worst_case:7.2%}  (per-sample AND over {len(result.evaluation_ids)} "
          f"evaluations, n={result.n_samples})")
    if result.adaptive_worst_case is not None:
        print(f"  {'adaptive worst case':<12} {result.adaptive_worst_case:7.2%}  (with "
              f"{len(result.adaptive_ids)} adaptive evaluations, n={result.adaptive_n})")
    for name, check in result.checks.items():
        if check.status in ("fail", "warn"):
            print(f"  {check.status.upper():<4} {name}: {check.summary}")
            if name in result.remedies:
                print(f"       {name}: {result.remedies[name]}")


def _eval_subject(args):
    """The model `bench eval` was given (a checkpoint file, --model or --robustbench) as a Subject,
    and the dataset when it had to be loaded to build it (else None)."""
    from bench.core.config import parse_assignments
    from bench.core.data import load_dataset
    from bench.core.threat import ThreatModel, parse_eps
    from bench.engine.external import build_factory, load_weights, normalized, parse_normalize
    from bench.engine.subject import Subject

    given = [flag for flag, value in (("CHECKPOINT", args.checkpoint), ("--model", args.model),
                                      ("--robustbench", args.robustbench)) if value]
    if len(given) != 1:
        raise BenchError("bench eval takes one model: a CHECKPOINT file, --model PKG.MODULE:FACTORY or "
                         "--robustbench NAME" + (f" (got {' and '.join(given)})" if given else ""))
    only = {"--model-arg": args.model_arg, "--weights": args.weights, "--normalize": args.normalize}
    if not args.model and any(only.values()):
        raise BenchError(f"{', '.join(k for k, v in only.items() if v)} go(es) with --model")
    if args.checkpoint:
        extra = [flag for flag, value in (("--dataset", args.dataset), ("--norm", args.norm), ("--eps", args.eps),
                                          ("--name", args.name)) if value]
        if extra:
            raise BenchError(f"{', '.join(extra)} describe(s) --model or --robustbench; a checkpoint file records "
                             f"its dataset and threat model")
        return Subject.from_checkpoint(args.checkpoint), None
    if not args.dataset:
        raise BenchError(f"{given[0]} needs --dataset (e.g. --dataset cifar10)")
    if args.robustbench:
        from bench.app.robustbench import package

        package()  # what to install, before any data is loaded
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    default = data.default_threat
    norm = args.norm or default.norm
    if args.eps is None and norm != default.norm:
        raise BenchError(f"--norm {norm} needs --eps ({args.dataset}'s default threat model is {default})")
    threat = ThreatModel(norm, parse_eps(args.eps, "--eps") if args.eps is not None else default.eps)
    if args.robustbench:
        from bench.app.robustbench import zoo_model

        model, path = zoo_model(args.robustbench, args.dataset, norm, args.model_dir)
        name = args.name or args.robustbench
        info = {"source": "robustbench", "robustbench": args.robustbench, "architecture": type(model).__name__}
        return Subject.external(model, name, data, threat, path=str(path), info=info), data
    model_args = parse_assignments(args.model_arg)
    model = build_factory(args.model, model_args)
    if args.weights:
        load_weights(model, args.weights)
    stats = parse_normalize(args.normalize, data.input_shape[0]) if args.normalize else None
    if stats:
        model = normalized(model, *stats)
    name = args.name or args.model + (f"({', '.join(f'{k}={v!r}' for k, v in model_args.items())})" if model_args else "")
    info = {"source": "factory", "factory": args.model, "model_args": model_args, "weights": args.weights,
            "normalize": list(stats) if stats else None, "architecture": args.model}
    return Subject.external(model, name, data, threat, path=args.weights, info=info), data


def _options(args, device: torch.device):
    from bench.app.runner import Options
    from bench.core.config import parse_assignments

    _fast(args, device)
    return Options(db=args.db, checkpoint_root=args.checkpoints, device=str(device), data_dir=args.data_dir,
                   fast=parse_assignments(args.fast),
                   workers=args.workers, threads=args.threads, backend=args.backend, lease_seconds=args.lease,
                   ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker,
                   slurm={"partition": args.slurm_partition, "time": args.slurm_time, "account": args.slurm_account,
                          "gres": args.slurm_gres, "folder": args.slurm_folder})


def cmd_run(args) -> None:
    from bench.app.progress import Progress, describe, estimate
    from bench.app.runner import execute, prepare, worker_threads
    from bench.app.suite import load_suite, load_suite_data
    from bench.store import Store

    suite = load_suite(args.suite)
    device = pick_device(args.device)
    data = load_suite_data(suite, args.data_dir)
    store = Store(args.db)  # opened only once the input is known to be good
    options = _options(args, device)
    reports = None if args.no_report else str(Path(args.reports).resolve())
    among = prepare(suite, data, store, options, reports, args.force)
    jobs = store.jobs(among)
    monitor = None
    if any(job.state != "done" and job.kind != "report" for job in jobs):
        plan = estimate(jobs, data, store, device, _fast(args, device), options.workers, worker_threads(options))
        print("\n".join(describe(suite.name, jobs, plan)), flush=True)
        monitor = Progress(store, among, suite.name, plan)
    outcome = execute(store, among, options, monitor=monitor)
    work = {kind: n for kind, n in outcome.ran.items() if kind != "report"}
    if work:
        print(f"[{suite.name}] trained {work.get('train', 0)} run(s), ran {sum(work.values()) - work.get('train', 0)} "
              f"evaluation job(s) (attacks, curves, checks, plants); {outcome.done_before} of {outcome.jobs} jobs were "
              "already done")
    elif not outcome.failed:
        print(f"[{suite.name}] nothing to do: all {outcome.jobs - (reports is not None)} jobs are already done in "
              f"{args.db} (use --force to redo them)")
    for key, error in outcome.failed:
        print(f"[{suite.name}] FAILED {key}: {error}")
    if outcome.failed or outcome.blocked:
        raise BenchError(f"{len(outcome.failed)} job(s) failed and {outcome.blocked} could not run because of them "
                         f"(see above; `bench plan --suite {args.suite}` shows them); fix the cause and run again")
    if reports is not None:
        print(f"report: {Path(reports) / 'index.html'}")


def cmd_plan(args) -> None:
    import json

    from bench.app.plan import describe
    from bench.app.runner import Options, prepare
    from bench.app.suite import load_suite, load_suite_data
    from bench.store import Store

    suite = load_suite(args.suite)
    data = load_suite_data(suite, args.data_dir)
    store = Store(args.db)
    options = Options(db=args.db, checkpoint_root=args.checkpoints, data_dir=args.data_dir)
    among = prepare(suite, data, store, options, None if args.no_report else str(Path(args.reports).resolve()), False)
    jobs = store.jobs(among)
    keys = {job.job_id: job.key for job in jobs}
    states = {job.job_id: job.state for job in jobs}
    for job in jobs:
        state = job.state
        if state == "pending" and any(states.get(d) == "failed" for d in job.depends):
            state = "blocked"
        if args.json:
            print(json.dumps({"key": job.key, "kind": job.kind, "state": state, "depends_on": [keys[d] for d in job.depends],
                              "attempts": job.attempts, "error": job.error, "what": describe(job)}))
        else:
            print(f"{job.kind:<9} {state:<8} {describe(job)}  [{job.key}]"
                  + (f"  after {len(job.depends)}" if job.depends else "") + (f"  error: {job.error}" if job.error else ""))
    if not args.json:
        counts = {s: sum(st == s for st in states.values()) for s in ("done", "pending", "running", "failed")}
        print(f"{len(jobs)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


def cmd_worker(args) -> None:
    from bench.app.worker import work
    from bench.core.config import parse_assignments

    device = pick_device(args.device)
    _fast(args, device)
    ran = work(args.db, args.checkpoints, str(device), threads=args.threads, data_dir=args.data_dir,
               lease_seconds=args.lease, fast=parse_assignments(args.fast))
    print(f"worker: ran {ran} job(s); none left")


def cmd_report(args) -> None:
    from bench.app.report import render_comparison, render_report
    from bench.store import Store

    if "://" not in args.db and not os.path.exists(args.db):
        raise BenchError(f"database {args.db!r} does not exist; run a suite first (python -m bench run --suite suites/demo.toml)")
    claims = args.claims if args.claims is not None else ("claims" if os.path.isdir("claims") else None)
    if claims is not None and not os.path.isdir(claims):
        raise BenchError(f"claims folder {claims!r} does not exist")
    store = Store(args.db, readonly=True)
    index = render_report(store, args.out, claims_dir=claims)
    print(f"report: {Path(index).resolve()}")
    if args.compare:
        page = render_comparison(store, args.out, *args.compare, claims_dir=claims)
        print(f"comparison: {Path(page).resolve()}")


def cmd_export(args) -> None:
    from bench.app.robustbench import export_model_info
    from bench.store import Store

    if "://" not in args.db and not os.path.exists(args.db):
        raise BenchError(f"database {args.db!r} does not exist; run a suite or bench eval first")
    paths = export_model_info(Store(args.db), args.robustbench)
    print(f"wrote {len(paths)} RobustBench model_info file(s) under {Path(args.robustbench).resolve()}")


def cmd_perf(args) -> None:
    (perf_train_command if args.what == "train" else perf_eval_command)(args)


def perf_train_command(args) -> None:
    from bench.app.perf_train import describe, parse_shape, perf_data, perf_train
    from bench.core.config import parse_assignments
    from bench.core.defense import DEFENSES
    from bench.core.models import model_params

    device = pick_device(args.device)
    fast = _fast(args, device)
    cuda = device.type == "cuda"
    shape = parse_shape(args.shape)
    batch = args.batch_size or (128 if cuda else 16)
    steps, rounds = args.steps or (20 if cuda else 2), args.rounds or (3 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    params, defense_params = parse_assignments(args.model_param), parse_assignments(args.set)
    model_params(args.model, params)
    DEFENSES.get(args.defense)(**defense_params)
    data, source = perf_data(shape, batch * (2 + warmup + steps), args.data_dir)
    print(describe(args.defense, args.model, shape, batch, device, fast, source, steps, rounds, warmup), flush=True)
    perf_train(args.defense, args.model, params, data, batch_size=batch, steps=steps, warmup=warmup, rounds=rounds,
               device=device, fast=fast, defense_params=defense_params)


def perf_eval_command(args) -> None:
    from bench.app.perf import DEFAULT_ATTACKS, load_reference, perf_eval, perf_ours, shape_spec
    from bench.app.perf_train import parse_shape
    from bench.core.config import parse_assignments
    from bench.core.data import eval_indices
    from bench.core.attack import EvalContext
    from bench.core.threat import ThreatModel
    from bench.engine.evaluation import auto_batch_size
    from bench.engine.pretrained import Pretrained
    from bench.engine.provenance import device_name
    from bench.engine.trainer import train
    from bench.store import Store

    device = pick_device(args.device)
    fast = _fast(args, device)
    specs = [parse_attack(a) for a in (args.attack or DEFAULT_ATTACKS)]
    if args.against == "torchattacks" and any(spec.params or spec.label != spec.attack for spec in specs):
        raise BenchError("--attack with a label or parameters needs --against fp32 or none (torchattacks' "
                         "equivalents are configured by name)")
    spec = None
    if args.model is not None or args.shape is not None:
        if args.checkpoint is not None:
            raise BenchError("--checkpoint and --model/--shape exclude each other")
        spec = shape_spec(args.model or "preact_resnet18", parse_assignments(args.model_param),
                          parse_shape(args.shape or "3x32x32"), args.n_samples, args.train_epochs, args.data_dir, device)
    model, data, norm, eps = load_reference(args.checkpoint, args.checkpoints, args.db, args.data_dir, device, spec)
    idx = torch.tensor(eval_indices(len(data.test_x), args.n_samples))
    x, y = data.test_x[idx], data.test_y[idx]
    where = f"{device_name(device)}, torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
    trained = f", PGD-AT {args.train_epochs} epoch(s)" if spec is not None else ""
    print(f"perf eval: {model.spec['name']}{trained} on {data.name} {'x'.join(map(str, data.input_shape))}, {norm} "
          f"eps={eps:g}, {len(idx)} samples, {args.repeats} repeats, {where}")
    if args.against == "torchattacks":
        print("  torchattacks configured alike (paper budgets)")
        perf_eval(model, x, y, norm, eps, data.num_classes, names=[spec.attack for spec in specs],
                  repeats=args.repeats, device=device)
        return
    for spec in specs:
        spec.params.setdefault("norm", norm)
        spec.params.setdefault("eps", eps if spec.params["norm"] == norm else None)
        if spec.params["eps"] is None:
            raise BenchError(f"attack {spec.label!r} uses {spec.params['norm']}: give its eps")
        spec.build()
    batch = auto_batch_size(model.to(device), data.input_shape, device) if args.batch_size == "auto" else args.batch_size
    print(f"  batch {batch}; fast path: " + " ".join(f"{k}={v}" for k, v in fast.record().items()
                                                       if k in ("precision", "channels_last", "cudnn_benchmark"))
          + ("; reference: precision=fp32 channels_last=False cudnn_benchmark=False" if args.against == "fp32" else ""))
    evaluator_like = Pretrained(data, Store(args.db), Path(args.checkpoints), device, ThreatModel(norm, eps),
                                model.spec["name"], model.spec.get("kwargs", {}), None, 0, trainer=train)

    def prepare(attack):  # as the evaluation does: a transfer surrogate is trained on demand (cached)
        attack.prepare(EvalContext(data, device, evaluator_like.asked_by(f"attack {attack.name!r}",
                                                                          attack.pretrained_defenses)))

    perf_ours(model, x, y, specs, against=args.against, batch_size=batch, fast=fast, repeats=args.repeats,
              device=device, prepare=prepare)


COMMANDS = {"list": cmd_list, "train": cmd_train, "eval": cmd_eval, "run": cmd_run, "plan": cmd_plan,
            "worker": cmd_worker, "perf": cmd_perf, "export": cmd_export, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished epochs and evaluations are saved; run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0
