"""The registered remedies (`bench.core.remedy`), one module per kind of answer: `logits`
(saturated or probability outputs), `eot` (randomness), `bpda` (a declared non-differentiable
preprocessing; operators that cut or flatten the gradient), `secant` (elementwise layers whose
derivative is not their slope), `surrogate` (a distilled surrogate: BPDA through it, transfer from it),
`blackbox` (score- and decision-based attacks with larger budgets). Sources: Athalye, Carlini &
Wagner 2018; Tramèr, Carlini, Brendel & Mądry 2020; Croce & Hein 2020. Importing this package
imports every module in it."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
