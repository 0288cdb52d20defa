"""`bench perf eval`: ours and torchattacks' attacks run side by side on the same samples, with
the same passes and the same outcome when configured alike; unknown names are refused; ours on the
fast path against the fp32 path. `bench perf train`: both loops timed in one run, with FLOPs."""

import pytest
import torch

from bench.app.perf import perf_eval, perf_ours, shape_spec
from bench.app.perf_train import parse_shape, perf_data, perf_train
from bench.core.errors import BenchError
from bench.core.threat import ThreatModel
from bench.engine.evaluation import AttackSpec
from bench.engine.fastpath import FastPath


def test_pairs_agree_and_are_timed(trained_model, synthetic):
    x, y = synthetic.test_x[:32], synthetic.test_y[:32]
    lines = []
    results = perf_eval(trained_model, x, y, "Linf", 0.1, synthetic.num_classes, names=("fgsm", "pgd", "apgd_ce"),
                        repeats=1, log=lines.append)
    assert list(results) == ["fgsm", "pgd", "apgd_ce"] and len(lines) == 4
    for name, (ours, theirs) in results.items():
        assert ours.seconds > 0 and theirs.seconds > 0
        assert ours.accuracy == theirs.accuracy, name  # the same algorithm, seed and samples
        assert ours.backward > 0 and abs(ours.backward - theirs.backward) <= 0.05 * theirs.backward, name
    assert results["pgd"][0].forward == 20 * 32  # 20 steps; the final prediction is outside the timing
    assert all(p.grad is None for p in trained_model.parameters())


def test_unknown_attack_is_refused(trained_model, synthetic):
    with pytest.raises(BenchError, match="no torchattacks equivalent to compare rays"):
        perf_eval(trained_model, synthetic.test_x[:4], synthetic.test_y[:4], "Linf", 0.1, 4, names=("rays",))


# --------------------------------------------------------------------------- ours on the fast path vs fp32

def test_fast_path_against_fp32_agrees_per_sample_on_the_cpu(trained_model, synthetic):
    """On the CPU the fast path is the fp32 path: same batches and seeds, identical verdicts."""
    specs = [AttackSpec("fgsm", "fgsm", {"norm": "Linf", "eps": 0.1}),
             AttackSpec("pgd_r2", "pgd", {"norm": "Linf", "eps": 0.1, "steps": 3, "restarts": 2})]
    lines = []
    results = perf_ours(trained_model, synthetic.test_x[:40], synthetic.test_y[:40], specs, against="fp32",
                        batch_size=16, fast=FastPath.default("cpu"), log=lines.append)
    assert list(results) == ["fgsm", "pgd_r2"] and len(lines) == 3
    for fast, reference in results.values():
        assert torch.equal(fast.robust, reference.robust) and fast.backward == reference.backward
    assert all("100.00%" in line for line in lines[1:])
    alone = perf_ours(trained_model, synthetic.test_x[:40], synthetic.test_y[:40], specs[:1], against="none",
                      batch_size=16, fast=FastPath(), log=lines.append)
    assert alone["fgsm"][1] is None and torch.equal(alone["fgsm"][0].robust, results["fgsm"][0].robust)


# --------------------------------------------------------------------------- perf train

@pytest.mark.parametrize("defense, params", [("pgd_at", {"steps": 2}), ("trades", {"steps": 2})])
def test_perf_train_times_both_loops_in_one_run(defense, params):
    data, source = perf_data((1, 8, 8), 64, None)
    assert "random data of shape 1x8x8" in source
    lines = []
    timings = perf_train(defense, "small_cnn", {"width": 4, "hidden": 8}, data, batch_size=16, steps=2, warmup=1,
                         rounds=1, device=torch.device("cpu"), fast=FastPath.default("cpu"), defense_params=params,
                         log=lines.append)
    assert set(timings) == {"fast", "reference"}
    assert all(t.seconds_per_step > 0 and t.flops_per_image > 0 and t.peak_bytes is None for t in timings.values())
    if defense == "pgd_at":  # the textbook attack also computes weight gradients
        assert timings["fast"].flops_per_image < timings["reference"].flops_per_image
    assert any(line.startswith("  ratio fast / reference:") for line in lines)
    assert any("peak unknown for this device" in line for line in lines)


def test_bad_perf_input_is_one_line():
    with pytest.raises(BenchError, match="--shape must be CxHxW"):
        parse_shape("3x32")
    data, _ = perf_data((1, 8, 8), 8, None)
    with pytest.raises(BenchError, match="--batch-size 16 is larger than the 8 training images"):
        perf_train("pgd_at", "small_cnn", {}, data, batch_size=16, steps=1, warmup=0, rounds=1,
                   device=torch.device("cpu"), fast=FastPath())


def test_shape_model_spec_falls_back_to_random_data_of_the_shape(tmp_path):
    spec = shape_spec("preact_resnet18", {}, (3, 32, 32), 100, 1, str(tmp_path), torch.device("cpu"))
    assert (spec.dataset, spec.dataset_options["shape"], spec.dataset_options["n_test"]) == ("synthetic", [3, 32, 32], 1000)
    assert (spec.defense, spec.train.epochs, spec.threat.key) == ("pgd_at", 1, ThreatModel("Linf", 8 / 255).key)
