"""The one error type for bad input a user fixes — a flag, a config value, a file, a record, a
request — as opposed to a bug. Entry points print an `InputError` as one line (`error: …`, exit
2) and let every other exception keep its traceback (`launch.common.run`). It is a `ValueError`,
so code that catches `ValueError` still catches it."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input, named in the message (the file, record and field, or the flag)."""


QUOTE_CHARS = 80  # the most of a user's string an error message quotes (decision 90)


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)` for an error message, at most `limit` characters of it: a 1 GB problem id
    must not become a 1 GB message. Longer strings are cut and say how long they were."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else text[:limit] + f"… ({len(text)} characters)"


__all__ = ["QUOTE_CHARS", "InputError", "quote"]
