"""The one exception evaluation raises for bad input, so callers can catch it apart from real bugs."""
from __future__ import annotations

from lsep_tune.schema import InputError


class EvaluationError(InputError):
    """Bad evaluation input, rendered as one line: ``<source>: <field>: <expectation>``.

    ``source`` names the file (or argument) at fault, ``field`` the part of it, ``expectation`` what
    was expected; the CLI prints ``error: <that line>`` and exits 2.
    """

