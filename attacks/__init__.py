"""Attacks, one file per family; importing this package imports every module in it, and each
registers its attacks (adding an attack is adding a file)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
