"""Errors caused by the user's input rather than by a bug.

The command line prints the message of a :class:`SuiteError` as one line and exits with status 2;
every message names the offending key or file and says how to fix it.
"""


class SuiteError(Exception):
    """Bad input: a config value, a missing or corrupt file, a checkpoint that does not fit."""


class DataError(SuiteError):
    """A data file is missing, unreadable or corrupt."""


class NumericalError(SuiteError):
    """NaN or Inf where a finite number is required (a loss, a gradient, an operator product)."""
