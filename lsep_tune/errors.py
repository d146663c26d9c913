"""Bad user input: one error type, and one way a command line reports it.

Library code raises `InputError(source, field, expectation)` naming what it knows (a file and a
config field, or a neutral argument name such as ``workers``). Only a command's ``__main__``
knows its flags: `run_cli` turns the source into the flag the user typed, prints the single line
``error: SOURCE: FIELD: expectation`` to stderr and returns exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Mapping

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad user input as one line, ``<source>: <field>: <expectation>``."""

    def __init__(self, source, field, expectation):
        self.source = str(source)
        self.field = str(field)
        self.expectation = " ".join(str(expectation).split())  # keep it on one line
        super().__init__(f"{self.source}: {self.field}: {self.expectation}")

    def __reduce__(self):
        # copied and pickled with its three parts (Ray copies a trial's exception to report it)
        return type(self), (self.source, self.field, self.expectation)

    def line(self, flags: Mapping[str, str] | None = None) -> str:
        """The message with a neutral source name replaced by the flag a command line uses for it."""
        source = (flags or {}).get(self.source, self.source)
        return f"{source}: {self.field}: {self.expectation}"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are InputErrors, so they print like every other bad input."""

    def error(self, message: str):
        raise InputError("command line", "arguments", message)


def run_cli(body: Callable[[], int], flags: Mapping[str, str] | None = None) -> int:
    """Run a command's body; bad input becomes one line on stderr and exit code 2."""
    try:
        return body()
    except InputError as err:
        print(f"error: {err.line(flags)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SystemExit as done:  # --help
        return int(done.code or 0)
