"""Benchmarks of the real training step, a search and a simulated large search: `python -m lsep_tune.bench train|search|cluster`."""
