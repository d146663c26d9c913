"""The shipped search spaces, installed as package data `lsep_tune.search_spaces` (see pyproject.toml)."""
