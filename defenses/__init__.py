"""Defenses (trainers), one file each; importing this package registers them all."""

from defenses import fast_at, fgsm_at, mart, natural, pgd_at, trades  # noqa: F401
