"""What every ``dualroute`` sub-command with its own parser shares: parse, run, and turn an
expected failure (bad input, a missing file) into one ``error: ...`` line and exit status 2.
Set ``DUALROUTE_TRACEBACK=1`` to get the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)


def run_command(parser: argparse.ArgumentParser, argv: list[str],
                command: Callable[[argparse.Namespace], int]) -> int:
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # --help, or a usage error argparse has printed
        return e.code if isinstance(e.code, int) else 0
    try:
        return command(args)
    except EXPECTED_ERRORS as e:
        if os.environ.get("DUALROUTE_TRACEBACK"):
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
