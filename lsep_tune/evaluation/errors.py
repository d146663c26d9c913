"""The one exception evaluation raises for bad input, so callers can catch it apart from real bugs."""
from __future__ import annotations


class EvaluationError(ValueError):
    """Bad evaluation input, rendered as one line: ``<source>: <field>: <expectation>``.

    ``source`` names the file (or argument) at fault, ``field`` the part of it, ``expectation`` what
    was expected; the CLI prints ``error: <that line>`` and exits 2.
    """

    def __init__(self, source: str, field: str, expectation: str):
        self.source = str(source)
        self.field = str(field)
        self.expectation = " ".join(str(expectation).split())  # keep it on one line
        super().__init__(f"{self.source}: {self.field}: {self.expectation}")
