"""Hyperparameter search: YAML search spaces (`search.space`) -> Optuna / Ray Tune, and the runner."""
