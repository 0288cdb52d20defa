"""atbench: evaluate any PyTorch model with the harness's attacks, curves and sanity checks.

    import atbench
    result = atbench.evaluate(model, dataset="cifar10", threat="Linf:8/255", n_samples=1000)

The API lives in `bench.app.api`; `bench` is the harness (command line: `bench`).
"""

from bench.app.api import Check, EvaluationResult, evaluate

__all__ = ["Check", "EvaluationResult", "evaluate"]
