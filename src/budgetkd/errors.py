"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class BudgetKDError(Exception):
    """A user-facing error: bad input, a refused configuration, a missing file.

    Raise it with a message that names the culprit (file, key, flag); ``budgetkd.cli`` prints
    ``budgetkd: error: <message>`` on one line and exits with status 2, without a traceback.
    """
