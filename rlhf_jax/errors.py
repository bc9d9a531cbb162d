"""The project's own error type: what the CLI reports in one line with exit code 2."""

from __future__ import annotations


class RlhfJaxError(Exception):
    """A problem with the user's input (a file, a config, a checkpoint), not a bug.

    The CLI prints the message without a traceback and exits with code 2, so the message
    must name what is wrong and where (file, line, field) without the stack.
    """
