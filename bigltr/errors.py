"""How bigltr's commands report bad input: one line on stderr, exit status 2.

Foundation level (docs/architecture.md): any module may raise `BadInputError`; the entry points (bigltr-eval,
bigltr-export) print it, and their other one-line errors, with `fail`.
"""
from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2


class BadInputError(ValueError):
    """Bad input to a bigltr command (a file that is not what it should be, weights that do not fit the model the
    config describes, ...), said in one line that names the file."""


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print `prog: message` on stderr; return `code`, the command's exit status."""
    print(f"{prog}: {message}", file=sys.stderr)
    return code
