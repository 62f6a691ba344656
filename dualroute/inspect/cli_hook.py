"""``dualroute inspect CHECKPOINT --out DIR``: the routing report of a checkpoint, as a console entry point.

``inspect_main(argv) -> exit status``: 0 on success, 2 with one ``error: ...`` line on stderr for bad
input (a missing or foreign checkpoint, data that does not fit the model, an output folder that cannot
be written) or bad arguments. Set ``DUALROUTE_TRACEBACK=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse

from ..cli_support import run_command



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dualroute inspect", allow_abbrev=False,
        description="What the routers of a checkpoint do: tokens per expert and group, MaxVio, entropy, "
                    "co-selection, specialisation, routing during training and (with --compare) between two "
                    "checkpoints. Writes PNG figures and report.md into --out; other files there are left alone.")
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--data", help="data path instead of the one saved in the checkpoint: a text file or "
                        "folder (.bin: uint16 token ids) for a language model, a folder of MNIST or CIFAR-10 "
                        "files for an image model")
    parser.add_argument("--compare", metavar="OTHER_CHECKPOINT",
                        help="a second checkpoint of the same shape, routed on the same tokens")
    parser.add_argument("--batches", type=int, default=8, help="validation batches to route (default 8)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    return parser


def inspect_main(argv: list[str]) -> int:
    return run_command(build_parser(), argv, _inspect)


def _inspect(args: argparse.Namespace) -> int:
    from . import analyse_checkpoint, check_output, write_report

    out = check_output(args.out)  # before the slow part
    analysis = analyse_checkpoint(args.checkpoint, data=args.data, compare=args.compare, batches=args.batches,
                                  device=args.device)
    report = write_report(analysis, out)
    print(summary(analysis))
    print(f"wrote {report} and its figures")
    return 0


def summary(an) -> str:
    """A few lines for the terminal: per layer MaxVio, entropy, specialisation and stability."""
    a = an.inspected
    label = "token" if a.token_labels else "class"
    tokens = f"{len(a.labels_T):,} tokens"
    if a.streams != [""]:
        tokens = " + ".join(f"{len(next(r for r in a.rows if r.stream == st).labels_T):,} {st}" for st in a.streams)
        tokens += " tokens"
    lines = [f"checkpoint {a.path} (step {a.checkpoint.extra.get('step')}), {tokens}"]
    for i, (s, sp) in enumerate(zip(an.layers, an.specialisation)):
        line = (f"  {a.layer_title(i)}: maxvio {s.maxvio:.2f} (groups {s.group_maxvio:.2f})  entropy {s.entropy:.2f}  "
                f"I({label}; expert) {sp.mi_expert:.2f} bits ({100 * sp.mi_expert_norm:.0f}% of H)")
        if an.stability is not None:
            line += f"  top-1 changed {100 * an.stability[i].top1_changed:.1f}%"
        lines.append(line)
    return "\n".join(lines)
