"""`bench perf eval`: ours and torchattacks' attacks run side by side on the same samples, with
the same passes and the same outcome when configured alike; unknown names are refused."""

import pytest

from bench.app.perf import perf_eval
from bench.core.errors import BenchError


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
