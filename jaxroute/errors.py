"""The one error type for bad input a user fixes — a flag, a config value, a file, a record, a
request — as opposed to a bug. Entry points print an `InputError` as one line (`error: …`, exit
2) and let every other exception keep its traceback (`launch.common.run`). It is a `ValueError`,
so code that catches `ValueError` still catches it."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, named in the message (the file, record and field, or the flag)."""


__all__ = ["InputError"]
