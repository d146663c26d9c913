"""Benchmarks of the real training step and of a search: `python -m lsep_tune.bench train|search`."""
