"""``dualroute translate RUN --text "..." | --input FILE [--output FILE] [--beam N]``: decode with a translation
(or G2P) checkpoint, one output line per input line, in input order.

Exit status 0; 2 with one ``error: ...`` line for bad input (a missing run or input file, a checkpoint that is
not a translation run, a file that is not UTF-8). ``DUALROUTE_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_support import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualroute translate", allow_abbrev=False,
        description="Translate text with a checkpoint of a translation or G2P run (mt-*, g2p-* presets): beam "
                    "search with the run's task.* decoding options unless overridden here.")
    parser.add_argument("path", help="checkpoint directory, or a run directory (its newest checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a sentence to translate (repeat for several)")
    source.add_argument("--input", help="a UTF-8 file, one sentence per line ('-' = standard input)")
    parser.add_argument("--output", help="write the translations here (default: standard output)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the run's task.beam_size)")
    parser.add_argument("--batch", type=int, default=64, help="sentences decoded together (default 64)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    return parser


def translate_main(argv: list[str]) -> int:
    return run_command(build_parser(), argv, _translate)


def read_input(path: str) -> list[str]:
    """The lines of ``path`` ('-' = stdin), without line ends; a non-UTF-8 line is an error naming it."""
    raw = sys.stdin.buffer.read() if path == "-" else _read_bytes(path)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}, line {number}: not valid UTF-8") from None
    return out


def _read_bytes(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no input file at {path}")
    return p.read_bytes()


def _translate(args: argparse.Namespace) -> int:
    from dualroute.train.tasks.translation import TranslationTask
    from dualroute.train.trainer import load_run, resolve_device

    if args.beam is not None and args.beam < 1:
        raise ValueError(f"--beam must be >= 1, got {args.beam}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    texts = args.text if args.text is not None else read_input(args.input)
    task, model, _ = load_run(args.path, device=args.device)
    if not isinstance(task, TranslationTask):
        raise ValueError(f"{args.path} is a {task.run_config.task_type.name!r} run; translate needs a translation "
                         f"or G2P run (presets mt-*, g2p-*)")
    out = task.translate(model, texts, resolve_device(args.device), beam_size=args.beam, batch_sentences=args.batch)
    text = "".join(line.replace("\n", " ") + "\n" for line in out)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
