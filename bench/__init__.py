"""Benchmark harness for adversarial-training defenses: registry → trainer → checkpoint →
evaluation → SQLite → HTML leaderboard. See README.md and DESIGN.md."""

__version__ = "0.1.0"
