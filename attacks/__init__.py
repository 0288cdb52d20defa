"""Attacks, one file per family; importing this package registers them all."""

from attacks import fgsm, mim, pgd  # noqa: F401
