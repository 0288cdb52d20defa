"""The registered sanity checks, one module per what they read: `model` (the model alone, before
the attacks), `attacks` (the stored attack results), `curves` (the stored curves). Sources:
Athalye, Carlini & Wagner 2018 (obfuscated gradients), Carlini et al. 2019 (on evaluating
adversarial robustness), Croce & Hein 2020 (AutoAttack's flags), Pintor et al. 2022 (indicators
of attack failure), Vivek & Babu 2020 (single-step gradient masking), and the sanity tests of the
seed papers. The contract is `bench.core.check`; the engine runs them (`bench.engine.sanity`).

Ordering checks ("A is at least as strong as B") measure the violation as the paired accuracy
difference acc(A) − acc(B) over the samples both cover; see `bench.core.stats.grade` for the rule.
Importing this package imports every module in it (adding a check is adding a class or a file).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
