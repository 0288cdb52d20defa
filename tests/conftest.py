"""Shared fixtures: the synthetic dataset, a tiny small_cnn, a quickly trained tiny model."""

from __future__ import annotations

import contextlib
import copy
import os
import uuid

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.core.data import Dataset, load_dataset
from bench.core.defense import TrainContext
from bench.core.models import build_model
from bench.core.threat import ThreatModel
from bench.engine.adaptive import AdaptiveSettings
from bench.engine.curves import CurveSettings
from bench.engine.evaluation import AttackSpec

# The models here are tiny (a few thousand parameters on 1x8x8 inputs): intra-op threads
# only add synchronization, and on a loaded machine OpenMP spin-waiting makes every op
# up to ~50x slower. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

TINY = {"width": 8, "hidden": 32}  # small_cnn kwargs for the tiny model (7,420 parameters)


def tiny_cnn(ds: Dataset, seed: int = 0, **params) -> nn.Module:
    """A tiny small_cnn for `ds` (more small_cnn `params`, e.g. head="cosine"), in train mode,
    initialized from `seed`."""
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=ds.num_classes, input_shape=ds.input_shape, mean=ds.mean,
                       std=ds.std, **{**TINY, **params})


@pytest.fixture(scope="session")
def synthetic() -> Dataset:
    """`load_dataset("synthetic")`: 4 classes, 1x8x8, 256 train / 64 val / 128 test. Read-only."""
    return load_dataset("synthetic")


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2, loss=F.cross_entropy,
        inputs=None) -> nn.Module:
    """The tests' one tiny training loop: `steps` full-batch Adam steps of `loss(model(inputs(model)),
    y)` (inputs default to x; give `inputs` to train on, say, adversarial examples), then eval mode
    and no parameter gradients left behind. Returns the model."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = x if inputs is None else inputs(model)
        model.train()
        loss_value = loss(model(batch), y)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="session")
def batch(synthetic) -> tuple[torch.Tensor, torch.Tensor]:
    """64 test images (a power of two, so a batch-mean loss is an exact rescaling of a batch sum)."""
    return synthetic.test_x[:64].clone(), synthetic.test_y[:64].clone()


@pytest.fixture(scope="session")
def torchattacks():
    """torchattacks 3.5.1, installed by the Makefile (--no-deps): the independent implementation
    our attacks are compared with; a missing install fails these tests."""
    import torchattacks

    assert torchattacks.__version__ == "3.5.1"
    return torchattacks


@pytest.fixture
def tiny_model(synthetic) -> nn.Module:
    """A fresh (untrained) tiny small_cnn in train mode, seed 0."""
    return tiny_cnn(synthetic)


@pytest.fixture(scope="session")
def trained_model(synthetic) -> nn.Module:
    """The tiny small_cnn after 30 full-batch Adam steps (lr 1e-2) on the synthetic training set
    (~0.2 s): ~98% test accuracy, not yet saturated (train loss ~5e-3), so input gradients are
    informative. Returned in eval mode. Shared by the session: do not train it or change its mode;
    take a `copy.deepcopy` for that.

    Its weights depend on the CPU's kernels: the 30 steps amplify float rounding, so a run with
    AVX2 kernels ends elsewhere than one with AVX-512 (measured: train loss 0.066 vs 0.005, test
    errors at samples 109 vs 37 and 119). Tests must not count on which samples it gets wrong or
    how many; where a test needs outcomes that hold on every CPU, it picks settings with a margin
    or uses the untrained `tiny_model` (seeded initialization only, the same everywhere)."""
    model = fit(tiny_cnn(synthetic), synthetic.train_x, synthetic.train_y, steps=30)
    with torch.no_grad():
        acc = (model(synthetic.test_x).argmax(1) == synthetic.test_y).float().mean().item()
    assert acc >= 0.95, f"the trained fixture model reaches only {acc:.3f} test accuracy"
    return model


# The training config of runs that `ctx.pretrained` trains in unit tests: one quick epoch.
PRETRAIN = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "val_steps": 1}


@pytest.fixture(scope="session")
def pretrained_root(tmp_path_factory):
    """A store and checkpoint folder shared by the session's pretrained runs (so each is trained once)."""
    from bench.store import Store

    root = tmp_path_factory.mktemp("pretrained")
    return Store(str(root / "results.db")), root / "checkpoints"


@pytest.fixture
def trained(trained_model) -> nn.Module:
    """A private copy of `trained_model` in train mode, as the trainer hands a model to a defense."""
    return copy.deepcopy(trained_model).train()


@pytest.fixture
def make_ctx(synthetic, pretrained_root):
    """make_ctx(model, norm="Linf", eps=0.1) -> a TrainContext as the trainer builds it. Its
    `pretrained` trains real (tiny, one-epoch) runs on the synthetic set, cached for the session."""
    from bench.engine.pretrained import Pretrained
    from bench.engine.runspec import build_train_config
    from bench.engine.trainer import train

    def make(model: nn.Module, norm: str = "Linf", eps: float = 0.1, num_classes: int = 4) -> TrainContext:
        threat = ThreatModel(norm, eps)
        store, checkpoints = pretrained_root
        pretrained = Pretrained(synthetic, store, checkpoints, torch.device("cpu"), threat, "small_cnn", dict(TINY),
                                build_train_config(PRETRAIN), seed=0, progress=False, trainer=train)
        return TrainContext(threat=threat, num_classes=num_classes, input_shape=synthetic.input_shape, epochs=1,
                            device=torch.device("cpu"), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            steps_per_epoch=1, pretrained=pretrained)

    return make



@pytest.fixture
def eval_ctx(synthetic, pretrained_root):
    """An EvalContext on the synthetic set, as evaluate_checkpoint builds it for an attack's `prepare`
    (its `pretrained` runs are tiny and cached for the session; callers give `train`)."""
    from bench.core.attack import EvalContext
    from bench.engine.pretrained import Pretrained
    from bench.engine.trainer import train

    store, checkpoints = pretrained_root
    pretrained = Pretrained(synthetic, store, checkpoints, torch.device("cpu"), synthetic.default_threat,
                            "small_cnn", dict(TINY), None, seed=0, progress=False, trainer=train)
    return EvalContext(synthetic, torch.device("cpu"), pretrained)


@pytest.fixture
def registered():
    """registered(registry, name, obj): register `obj` under `name` for this test only (the
    registry is restored afterwards, `Registry.temporary`)."""
    with contextlib.ExitStack() as stack:
        def register(registry, name: str, obj):
            assert name not in registry
            stack.enter_context(registry.temporary())
            return registry.register(name)(obj)

        yield register


# --------------------------------------------------------------------------- honest and planted models, evaluated

PLANTED_EPS = 0.1
PLANTED_ATTACKS = [AttackSpec("fgsm", "fgsm", {"eps": 0.1}), AttackSpec("pgd20", "pgd", {"eps": 0.1, "steps": 20}),
                   AttackSpec("pgd_cw", "pgd", {"eps": 0.1, "steps": 20, "loss": "cw"}),
                   AttackSpec("noise", "noise", {"eps": 0.1}),
                   AttackSpec("transfer", "transfer", {"eps": 0.1, "surrogate_epochs": 5}),
                   AttackSpec("rays", "rays", {"eps": 0.1, "queries": 500}),
                   AttackSpec("aa", "autoattack", {"eps": 0.1, "n_target_classes": 3, "square_queries": 500})]
PLANTED_CURVES = CurveSettings(n_samples=None, steps=(1, 10, 100), restarts=(1, 5))
_SURROGATE = {"surrogate_model_params": dict(TINY), "rounds": 2, "epochs": 15}
REMEDY_BUDGETS = AdaptiveSettings(remedies={
    "logit_recovery": {"steps": 30, "n_target_classes": 3}, "eot": {"steps": 30, "max_k": 8},
    "bpda_ste": {"steps": 30, "n_target_classes": 3}, "bpda_ops": {"steps": 30, "n_target_classes": 3},
    "bpda_secant": {"steps": 30, "n_target_classes": 3},
    "bpda_surrogate": {"steps": 30, "n_target_classes": 3, **_SURROGATE},
    "square": {"queries": 500, "restarts": 1}, "rays": {"queries": 500},
    "transfer_surrogate": {"steps": 30, "restarts": 2, **_SURROGATE}})
# the check each planted failure must fail, and the remedy that must close it
FIX = {"quantized": ("gradients_nonzero", "bpda_ops"), "softmax": ("logits_not_probabilities", "logit_recovery"),
       "scaled_logits": ("gradients_nonzero", "logit_recovery"), "noisy": ("deterministic_outputs", "eot"),
       "jpeg": ("gradients_nonzero", "bpda_ste"), "shattered": ("white_box_beats_black_box", "bpda_secant"),
       "batch_random": ("deterministic_outputs", "eot"), "partial": ("gradients_nonzero", "bpda_ops")}
HONEST = ("natural", "pgd_at", "trades")


@pytest.fixture(scope="session")
def planted_bench(tmp_path_factory):
    """Tiny natural, PGD-AT and TRADES models on the synthetic set (4 classes, Linf 0.1), every
    planted failure made from the PGD-trained one, all evaluated with seven attacks, the curves,
    the checks and the adaptive stage (remedies at small budgets) in one store. Returns (store,
    {name: checkpoint path})."""
    from bench.core.planted import PLANTS
    from bench.engine.checkpoint import plant
    from bench.engine.runspec import RunSpec, build_train_config
    from bench.engine.stage import evaluate_checkpoint
    from bench.engine.trainer import train
    from bench.store import Store

    root = tmp_path_factory.mktemp("planted")
    data = load_dataset("synthetic")
    store = Store(str(root / "results.db"))
    train_cfg = {"epochs": 15, "batch_size": 32, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "val_steps": 3}
    paths = {}
    for defense in HONEST:
        spec = RunSpec(defense=defense, dataset="synthetic", model="small_cnn", threat=ThreatModel("Linf", PLANTED_EPS),
                       train=build_train_config(train_cfg), model_params=dict(TINY), seed=0)
        paths[defense] = train(spec, data, store=store, checkpoint_root=root / "ck", progress=False).directory / "last.pt"
    for kind in PLANTS:
        paths[kind] = plant(paths["pgd_at"], kind, root / f"{kind}.pt")
    for path in paths.values():
        evaluate_checkpoint(store, path, data, PLANTED_ATTACKS, curves=PLANTED_CURVES, sanity=True,
                            adaptive=REMEDY_BUDGETS, checkpoint_root=root / "ck", log=lambda _: None)
    return store, paths


POSTGRES = os.environ.get("ATBENCH_TEST_POSTGRES")  # an admin URL of a real server (.ci/run starts one)


@contextlib.contextmanager
def postgres_database():
    """A fresh PostgreSQL database on the ATBENCH_TEST_POSTGRES server, dropped afterwards; yields its URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"atbench_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as con:
        con.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as con:
            con.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A new, empty database of each backend: a SQLite file, and a PostgreSQL database on the server
    ATBENCH_TEST_POSTGRES names (CI starts one; without it the PostgreSQL half is skipped)."""
    if request.param == "sqlite":
        yield str(tmp_path / "results.db")
        return
    if not POSTGRES:
        pytest.skip("set ATBENCH_TEST_POSTGRES to a PostgreSQL admin URL (.ci/run does) to test that backend")
    with postgres_database() as url:
        yield url
