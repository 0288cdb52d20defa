"""The adversary library: the PGD-family primitives that attacks, defenses, the trainer's
validation and the curves share (losses, ball geometry, random starts, the one projected-ascent
loop with its restarts and early stopping, the inner maximizations of adversarial training).

`REVISION` is part of the identity of every run and evaluation (see `bench.core.revision`):
bump it whenever a change here can change a result.
"""

REVISION = 1
