"""Errors a user can cause: bad config, missing paths, bad data, unreachable cluster.

The CLI turns a `UserError` into one line on stderr and exit code 2; every other exception is a
bug in fl_llm and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix: the message says what and where."""


class PlatformGone(RuntimeError):
    """A platform's process ended (a platform service's Ray actor died): it must be started again."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (300 characters), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
