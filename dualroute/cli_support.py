"""What every ``dualroute`` sub-command with its own parser shares: parse, run, and turn an
expected failure (bad input, a missing file) into one ``error: ...`` line and exit status 2.
Set ``DUALROUTE_TRACEBACK=1`` to get the traceback instead."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

EXPECTED_ERRORS = (ValueError, TypeError, OSError, ImportError)
DEFAULT_TEMPERATURE = 0.8  # both `dualroute generate` forms (a checkpoint, or --hf PATH) sample alike


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The decoding options that ``dualroute generate`` and ``dualroute generate --hf`` share, one default each."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help="softmax temperature; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens "
                        "whose probability reaches p")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")


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
