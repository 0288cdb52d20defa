"""Nothing stale: every plugin (attack, defense, check, remedy), the adversary library, the training loop
and the evaluation protocol carry a revision that is part of the identity of what they produce.
`tests/revisions.lock` records, for each, its revision and a hash of the source it depends on;
a source that changed without its revision changing fails here.

When it fails, either bump the `revision` (results can change: what depends on it is recomputed)
or record why results cannot change, then update the lock:

    python tests/test_revisions.py --update "why results cannot change (or: revision bumped)"

The reason is kept on the changed lines of the lock. The second half of this file checks that a
revision bump invalidates exactly what depends on it.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
LOCK = Path(__file__).resolve().parent / "revisions.lock"


def _hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def current() -> dict[str, tuple[str, str]]:
    """{entry: (revision, source hash)} of everything that carries a revision."""
    from bench import adversary
    from bench.core.attack import ATTACKS
    from bench.core.check import CHECKS
    from bench.core.defense import DEFENSES
    from bench.core.remedy import REMEDIES
    from bench.engine import evaluation, runspec

    out = {"adversary": (str(adversary.REVISION), _hash(*(ROOT / "bench" / "adversary").glob("*.py"))),
           "trainer": (str(runspec.TRAINER_REVISION), _hash(ROOT / "bench/engine/trainer.py", ROOT / "bench/engine/runspec.py")),
           "evaluation": (str(evaluation.PROTOCOL), _hash(ROOT / "bench/engine/evaluation.py", ROOT / "bench/engine/curves.py"))}
    plugins = {f"{kind}:{name}": registry.get(name)
               for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES), ("check", CHECKS),
                                      ("remedy", REMEDIES))
               for name in registry.names()}
    for entry, cls in plugins.items():
        out[entry] = (str(cls.revision), _plugin_hash(cls, [c for c in plugins.values() if c is not cls]))
    return out


def _plugin_hash(cls, others) -> str:
    """The hash of the module a plugin lives in, without the other plugins defined there (so that
    editing one attack of attacks/apgd.py does not touch its siblings' entries; a change to a
    shared helper in the module does)."""
    path = Path(inspect.getsourcefile(cls))
    text = path.read_text()
    for other in others:
        if inspect.getsourcefile(other) == str(path) and not issubclass(cls, other):
            text = text.replace(inspect.getsource(other), "")
    return hashlib.sha256(path.relative_to(ROOT).as_posix().encode() + b"\0" + text.encode()).hexdigest()[:16]


def read_lock() -> dict[str, tuple[str, str, str]]:
    """{entry: (revision, hash, reason)}."""
    out = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            fields, _, reason = line.partition("#")
            name, revision, digest = fields.split()
            out[name] = (revision, digest, reason.strip())
    return out


def update(reason: str) -> list[str]:
    """Rewrite the lock from the current sources; returns the entries that changed. An entry whose
    source changed under the same revision keeps `reason` (required then)."""
    old, now = read_lock() if LOCK.exists() else {}, current()
    changed = [name for name in now if old.get(name, (None, None))[:2] != now[name]]
    silent = [name for name in changed if name in old and old[name][0] == now[name][0]]
    if silent and not reason:
        raise SystemExit(f"sources changed under the same revision: {', '.join(silent)}; give the reason "
                         "results cannot change (or bump their revisions)")
    lines = ["# name  revision  source-hash  # why the source changed without a new revision (see test_revisions.py)"]
    for name, (revision, digest) in sorted(now.items()):
        note = reason if name in changed else old.get(name, ("", "", ""))[2]
        lines.append(f"{name}  {revision}  {digest}" + (f"  # {note}" if note else ""))
    LOCK.write_text("\n".join(lines) + "\n")
    return changed


def test_every_source_change_has_a_revision_or_a_reason():
    lock, now = read_lock(), current()
    problems = []
    for name, (revision, digest) in sorted(now.items()):
        if name not in lock:
            problems.append(f"{name}: not in the lock")
        elif lock[name][:2] != (revision, digest):
            what = "and its revision" if lock[name][0] != revision else "but not its revision"
            problems.append(f"{name}: its source changed {what}")
    problems += [f"{name}: in the lock but no longer exists" for name in lock if name not in now]
    assert not problems, ("; ".join(problems) + ". Bump the revision where results can change, then run "
                          "`python tests/test_revisions.py --update REASON`")


# --------------------------------------------------------------------------- what a revision bump invalidates

def test_a_defense_revision_changes_its_runs_and_those_that_train_it_on_demand(monkeypatch):
    from bench.core.defense import DEFENSES
    from bench.core.threat import ThreatModel
    from bench.engine.runspec import RunSpec

    def run_ids():
        return {d: RunSpec(defense=d, dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", 0.1)).run_id
                for d in ("natural", "pgd_at", "trades", "tgcl", "eat")}

    before = run_ids()
    monkeypatch.setattr(DEFENSES.get("pgd_at"), "revision", DEFENSES.get("pgd_at").revision + 1)
    after = run_ids()
    assert {d for d in before if before[d] != after[d]} == {"pgd_at", "tgcl"}  # TGCL trains a PGD-AT teacher


def test_an_attack_revision_recomputes_it_and_the_attacks_made_of_it(tmp_path, monkeypatch, synthetic, trained_model):
    from bench.core.attack import ATTACKS
    from bench.engine.checkpoint import atomic_save, model_checkpoint
    from bench.engine.evaluation import AttackSpec
    from bench.engine.stage import evaluate_checkpoint
    from bench.store import Store

    path = tmp_path / "model.pt"
    atomic_save(model_checkpoint(trained_model, run_id=None, epoch=1, dataset="synthetic",
                                 dataset_options=synthetic.options, norm="Linf", eps=0.1), path)
    specs = [AttackSpec("pgd", "pgd", {"eps": 0.1, "steps": 3}), AttackSpec("fab", "fab", {"eps": 0.1, "steps": 3}),
             AttackSpec("aa", "autoattack", {"eps": 0.1, "version": "standard", "apgd_steps": 3, "fab_steps": 3,
                                             "square_queries": 10, "n_target_classes": 1})]
    store = Store(str(tmp_path / "results.db"))

    def computed():
        report = evaluate_checkpoint(store, path, synthetic, specs, n_samples=16, log=lambda _: None)
        return {o.label for o in report.outcomes if not o.cached}

    assert computed() == {"clean", "pgd", "fab", "aa"}
    assert computed() == set()
    monkeypatch.setattr(ATTACKS.get("fab"), "revision", ATTACKS.get("fab").revision + 1)
    assert computed() == {"fab", "aa"}  # AutoAttack runs FAB-T


def test_a_check_revision_recomputes_that_check_only(tmp_path, monkeypatch, synthetic, trained_model):
    from bench.core.check import CHECKS
    from bench.engine.checkpoint import atomic_save, model_checkpoint
    from bench.engine.evaluation import AttackSpec
    from bench.engine.stage import evaluate_checkpoint
    from bench.store import Store

    path = tmp_path / "model.pt"
    atomic_save(model_checkpoint(trained_model, run_id=None, epoch=1, dataset="synthetic",
                                 dataset_options=synthetic.options, norm="Linf", eps=0.1), path)
    store = Store(str(tmp_path / "results.db"))

    def rerun():
        return evaluate_checkpoint(store, path, synthetic, [AttackSpec("fgsm", "fgsm", {"eps": 0.1})], n_samples=16,
                                   sanity=True, log=lambda _: None).checks

    assert set(rerun()) == set(CHECKS.names())
    assert rerun() is None
    monkeypatch.setattr(CHECKS.get("gradients_nonzero"), "revision", CHECKS.get("gradients_nonzero").revision + 1)
    assert set(rerun()) == {"gradients_nonzero"}
    assert rerun() is None


def test_a_remedy_revision_recomputes_its_adaptive_evaluations_only(tmp_path, monkeypatch, synthetic, trained_model):
    from bench.core.remedy import REMEDIES
    from bench.engine.adaptive import AdaptiveSettings
    from bench.engine.checkpoint import atomic_save, model_checkpoint, plant
    from bench.engine.evaluation import AttackSpec
    from bench.engine.stage import evaluate_checkpoint
    from bench.store import Store

    base = tmp_path / "model.pt"
    atomic_save(model_checkpoint(trained_model, run_id=None, epoch=1, dataset="synthetic",
                                 dataset_options=synthetic.options, norm="Linf", eps=0.1), base)
    path = plant(base, "softmax", tmp_path / "softmax.pt")
    store = Store(str(tmp_path / "results.db"))
    settings = AdaptiveSettings(remedies={"logit_recovery": {"steps": 3, "n_target_classes": 1}})

    def computed():
        report = evaluate_checkpoint(store, path, synthetic, [AttackSpec("pgd", "pgd", {"eps": 0.1, "steps": 3})],
                                     n_samples=16, sanity=True, adaptive=settings, log=lambda _: None)
        return report.computed, report.adaptive is not None

    assert computed() == (2 + 2, True)  # clean, pgd; the remedy's APGD-CE and APGD-T
    assert computed() == (0, False)
    monkeypatch.setattr(REMEDIES.get("logit_recovery"), "revision", REMEDIES.get("logit_recovery").revision + 1)
    assert computed() == (2, True)


def test_the_adversary_revision_changes_every_run_and_evaluation_identity(monkeypatch):
    from bench import adversary
    from bench.core.threat import ThreatModel
    from bench.engine.evaluation import Evaluator
    from bench.engine.runspec import RunSpec

    spec = RunSpec(defense="natural", dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", 0.1))
    before = spec.run_id, Evaluator.config_hash("noise", {"draws": 1}, "atbench r1")
    monkeypatch.setattr(adversary, "REVISION", adversary.REVISION + 1)
    after = spec.run_id, Evaluator.config_hash("noise", {"draws": 1}, "atbench r1")
    assert before[0] != after[0] and before[1] != after[1]


if __name__ == "__main__":
    if sys.argv[1:2] != ["--update"]:
        raise SystemExit(__doc__)
    sys.path.insert(0, str(ROOT))
    changed = update(" ".join(sys.argv[2:]).strip())
    print(f"{LOCK.name}: {len(changed)} entries changed" + (f" ({', '.join(changed)})" if changed else ""))
