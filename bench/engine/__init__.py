"""The engine: training (`trainer`, `runspec`, `pretrained`), checkpoint files, and the evaluation
stage (`evaluation` → `curves` → `sanity`, run together by `stage`). Imports the contracts, the
adversary library and the store; never a plugin module."""
