"""Write an ``Analysis`` as PNG figures and a ``report.md`` that links them.

Only the files named here are written (and overwritten on a rerun); nothing else in the output folder
is touched. Shapes: E experts, G groups, Y labels, L layers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from . import figures
from .analysis import Analysis
from .stats import Series

REPORT = "report.md"
CONTEXT_BEFORE, CONTEXT_AFTER = 24, 12  # tokens shown around a routed token
_VISIBLE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥", "\r": "\\r"})


def check_output(out: str | os.PathLike) -> Path:
    """``out`` as a Path, if it is (or can be created as) a writable folder; ValueError naming it if not."""
    out = Path(out)
    probe = out
    while not probe.exists():  # the nearest existing ancestor decides whether ``out`` can be created
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot write the output folder {out}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the output folder {out}: {probe} is not writable")
    return out


def write_report(an: Analysis, out: str | os.PathLike) -> Path:
    """Draw every figure of ``an`` into ``out``, then ``report.md`` linking them; returns the report's path."""
    out = check_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot write the output folder {out}: {e.strerror or e}") from e
    drawn = draw(an, out)
    path = out / REPORT
    path.write_text(render(an, {k: p.name for k, p in drawn.items()}), encoding="utf-8")
    return path


def draw(an: Analysis, out: Path) -> dict[str, Path]:
    """Every figure that applies to ``an``, by key; file names are fixed so a rerun overwrites its own."""
    a = an.inspected
    titles = [a.layer_title(i) for i in range(len(an.layers))]
    drawn = {
        "load": figures.load_bars(an.layers, out / "load.png", titles),
        "usage": figures.usage_heatmaps(an.layers, out / "group_expert_usage.png", titles),
        "coselection": figures.coselection_heatmaps(an.layers, out / "coselection.png", titles),
    }
    for h in an.heatmaps:
        rows = [_label_name(a, y, h.layers[0]) for y in h.labels]
        mine = [titles[i] for i in h.layers]
        if a.token_labels:
            name = f"token_expert_{h.stream}.png" if h.stream else "token_expert.png"
            drawn[_heatmap_key(h.stream)] = figures.label_heatmaps(h.shown, rows, "token", out / name, mine)
        else:
            drawn[_heatmap_key(h.stream)] = figures.label_heatmaps(h.shown, rows, "class", out / "class_expert.png")
            drawn["groups"] = figures.group_heatmaps([s.label_group_YG for s in an.specialisation], rows,
                                                     out / "class_group.png")
    if an.history:
        drawn["history"] = figures.history_plot(an.history, _step(an), out / "training.png", titles)
    if an.stability is not None:
        drawn["stability"] = figures.stability_plot(an.stability, out / "stability.png", titles)
    return drawn


def _heatmap_key(stream: str) -> str:
    return f"specialisation_{stream}" if stream else "specialisation"


# ---------------------------------------------------------------------------------------------- markdown


def render(an: Analysis, figs: dict[str, str]) -> str:
    sections = [_header(an), _load(an, figs), _coselection(an, figs), _specialisation(an, figs),
                _training(an, figs), _stability(an, figs)]
    return "\n\n".join(s for s in sections if s) + "\n"


def _step(an: Analysis) -> int | None:
    return an.inspected.checkpoint.extra.get("step")


def _header(an: Analysis) -> str:
    a, m = an.inspected, an.inspected.moe
    model = type(a.model).__name__
    router = f"{m.router.group_router} group router, {m.router.score_func} scores"
    if m.router.correction_bias:
        router += ", correction bias"
    n_seq = int((a.positions_T == 0).sum())
    per = "tokens" if a.is_lm else "tokens (class token + patches)"
    if _one_token_per_image(a):
        per = "token (the pooled feature map: one routing decision per image)"
    data = (f"Data: {a.data_label}, validation split: {n_seq:,} {'sequences' if a.is_lm else 'images'} of "
            f"{len(a.positions_T) // max(n_seq, 1)} {per}, {len(a.labels_T):,} tokens in all (model in eval mode).")
    if a.streams != [""]:
        parts = []
        for stream in a.streams:
            layer = next(i for i, r in enumerate(a.rows) if r.stream == stream)
            r, names = a.rows[layer], [a.layer_name(i) for i, x in enumerate(a.rows) if x.stream == stream]
            parts.append(f"{stream} stream (layers {', '.join(names)}): {int((r.positions_T == 0).sum()):,} "
                         f"sequences, {len(r.labels_T):,} tokens")
        data = (f"Data: {a.data_label}, validation split; {'; '.join(parts)}. Each layer's rows are the real "
                "tokens of the stream it routes (padding left out), labelled by their token id (model in eval mode).")
    return "\n".join([
        "# Routing report",
        "",
        f"Checkpoint `{a.path}` (step {_step(an)}).",
        f"Model: {model}, {len(a.layers)} MoE layers, each with E={m.num_experts} experts in G={m.num_groups} "
        f"groups of M={m.num_experts // m.num_groups}; J={m.groups_per_token} groups and K={m.experts_per_token} "
        f"experts per token ({router}).",
        data,
    ])


def _load(an: Analysis, figs: dict[str, str]) -> str:
    a, m = an.inspected, an.inspected.moe
    E, G = m.num_experts, m.num_groups
    lines = ["## Load per layer", "",
             f"| layer | tokens | MaxVio experts | MaxVio groups | entropy experts (max {math.log(E):.2f}) "
             f"| entropy groups (max {math.log(G):.2f}) | dropped |", "|---|---|---|---|---|---|---|"]
    for i, s in enumerate(an.layers):
        lines.append(f"| {a.layer_name(i)} | {s.num_tokens:,} | {s.maxvio:.3f} | {s.group_maxvio:.3f} "
                     f"| {s.entropy:.3f} "
                     f"| {s.group_entropy:.3f} | {100 * s.dropped_rate:.2f}% |")
    lines += ["", "MaxVio = max load / mean load - 1 over all inspected tokens (0 = perfectly balanced); "
              "entropy = mean over tokens of the router's distribution, in nats. Group load counts each "
              "token once per kept group, so it need not equal the sum of the group's expert loads.", "",
              "Share of routed rows per expert and per group, in %:", "",
              "| layer | " + " | ".join(f"e{e}" for e in range(E)) + " | " + " | ".join(f"g{g}" for g in range(G))
              + " |", "|---" * (1 + E + G) + "|"]
    for i, s in enumerate(an.layers):
        lines.append(f"| {a.layer_name(i)} | " + " | ".join(_pct(s.tokens_per_expert_E)) + " | "
                     + " | ".join(_pct(s.tokens_per_group_G)) + " |")
    lines += ["", f"![tokens per expert and per group]({figs['load']})", "",
              "Group x expert usage (rows: groups, columns: the experts of a group; % of routed rows):", "",
              f"![group x expert usage]({figs['usage']})"]
    return "\n".join(lines)


def _pct(counts: np.ndarray) -> list[str]:
    total = max(int(counts.sum()), 1)
    return [f"{100 * c / total:.1f}" for c in counts]


def _coselection(an: Analysis, figs: dict[str, str]) -> str:
    a, m = an.inspected, an.inspected.moe
    E, K = m.num_experts, m.experts_per_token
    lines = ["## Experts chosen together", "",
             "| layer | most frequent pair | % of tokens | least frequent pair | % of tokens |",
             "|---|---|---|---|---|"]
    for i, s in enumerate(an.layers):
        pairs = [(s.coselect_EE[p, q], p, q) for p in range(E) for q in range(p + 1, E)]
        if not pairs:
            continue
        most, least = max(pairs, key=lambda t: (t[0], -t[1], -t[2])), min(pairs)
        share = lambda c: f"{100 * c / max(s.num_tokens, 1):.2f}"  # noqa: E731
        lines.append(f"| {a.layer_name(i)} | e{most[1]} + e{most[2]} | {share(most[0])} | e{least[1]} + e{least[2]} "
                     f"| {share(least[0])} |")
    uniform = 100 * K * (K - 1) / (E * (E - 1)) if E > 1 else 0.0
    lines += ["", f"If each token drew its {K} experts uniformly at random, every pair would hold "
              f"{uniform:.2f}% of tokens.", "", f"![co-selection]({figs['coselection']})"]
    return "\n".join(lines)


def _specialisation(an: Analysis, figs: dict[str, str]) -> str:
    a = an.inspected
    E, K = a.moe.num_experts, a.moe.experts_per_token
    label = "token id" if a.token_labels else "class"
    head = f"| layer | I({label}; expert) bits | / H({label}) | I({label}; group) bits | / H({label}) | " \
           "shuffled labels bits |"
    if not a.token_labels:
        head += " class token only bits | class token, shuffled |"
    lines = ["## Specialisation", "", head, "|---" * (head.count("|") - 1) + "|"]
    for i, s in enumerate(an.specialisation):
        row = (f"| {a.layer_name(i)} | {s.mi_expert:.3f} | {s.mi_expert_norm:.3f} | {s.mi_group:.3f} "
               f"| {s.mi_group_norm:.3f} "
               f"| {s.mi_expert_shuffled:.3f} |")
        first = f" {s.mi_expert_first:.3f} | {s.mi_expert_first_shuffled:.3f} |" if not a.token_labels else ""
        lines.append(row + first)
    h = an.specialisation[0].label_entropy if an.specialisation else 0.0
    entropy = f"H({label}) = {h:.3f} bits"
    if a.streams != [""]:
        entropy = ", ".join(f"H({label}) = {an.specialisation[hm.layers[0]].label_entropy:.3f} bits over the "
                            f"{hm.stream} stream" for hm in an.heatmaps)
    lines += ["", f"{entropy}. Mutual information is the plug-in estimate over routed rows "
              f"(token, chosen expert); it equals H({label}) when the expert determines the {label} and 0 when "
              "routing ignores it. The shuffled column is the same estimate with the labels permuted: the "
              "estimate's bias on this much data."]
    if a.token_labels:
        lines += ["", "Where the most frequent tokens go: P(expert | token), the share of a token's routed rows that "
                  f"each expert takes (at most 1/K = {100 / K:.0f}%; {100 / E:.1f}% each if routing ignored "
                  "the token)."]
        for h in an.heatmaps:
            if h.stream:
                lines += ["", f"The {h.stream} stream's most frequent tokens (layers "
                          f"{', '.join(a.layer_name(i) for i in h.layers)}):"]
            lines += ["", f"![P(expert | token) for the most frequent tokens]({figs[_heatmap_key(h.stream)]})"]
        lines += ["", _top_tokens(an), "", _examples(an)]
    elif _one_token_per_image(a):
        lines += ["", "Each image is one token (its pooled features, e.g. a CNN's conv MoE blocks), so the class "
                  "token columns repeat the others. Where each class goes: P(expert | class), the share of its "
                  f"routed rows that each expert takes (at most 1/K = {100 / K:.0f}%; {100 / E:.1f}% each if routing "
                  "ignored the class); then P(group | class) over (image, kept group) pairs.", "",
                  f"![P(expert | class)]({figs['specialisation']})", "",
                  f"![P(group | class)]({figs['groups']})"]
    else:
        lines += ["", "Every token of an image (class token and patches) carries the image's class. Where each "
                  "class goes: P(expert | class), the share of its routed rows that each expert takes (at most "
                  f"1/K = {100 / K:.0f}%; {100 / E:.1f}% each if routing ignored the class), over all tokens and "
                  "for the class token alone; then P(group | class) over (token, kept group) pairs.", "",
                  f"![P(expert | class)]({figs['specialisation']})", "",
                  f"![P(group | class)]({figs['groups']})"]
    return "\n".join(lines)


def _one_token_per_image(a) -> bool:
    """An image model routing each image once (positions all 0), not its patches."""
    return not a.token_labels and bool((a.positions_T == 0).all())


def _top_tokens(an: Analysis) -> str:
    a = an.inspected
    lines = ["### Tokens each expert receives most", "",
             "Each entry: token, routed rows, and in brackets P(expert | token), the share of that token's rows "
             "that went to this expert.", ""]
    for i, (per_expert, s) in enumerate(zip(an.top_tokens, an.specialisation)):
        total_Y = s.label_expert_YE.sum(1)
        name = f"Layer {i}" if a.rows[i].name is None else f"Layer {a.rows[i].name} ({a.rows[i].stream} tokens)"
        lines += [f"{name}:", "", "| expert | rows | top tokens |", "|---|---|---|"]
        for e, tops in enumerate(per_expert):
            cells = ", ".join(f"{_code(_label_name(a, y, i))} {c} ({100 * c / total_Y[y]:.0f}%)" for y, c in tops)
            lines.append(f"| e{e} | {int(s.label_expert_YE[:, e].sum()):,} | {cells} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def _examples(an: Analysis) -> str:
    a = an.inspected
    lines = ["### Examples in context", "",
             "Tokens whose top-1 expert (largest combine weight) is the one named; the routed token is in ⟦ ⟧, "
             "↵ marks a newline; inside ⟦ ⟧ a space shows as ␣."]
    for i, per_expert in enumerate(an.examples):
        lines += ["", f"<details><summary>{a.layer_title(i)}</summary>", "", "~~~"]
        for e, picks in enumerate(per_expert):
            lines += [f"e{e}: {_in_context(a, t, i)}" for t in picks]
        lines += ["~~~", "", "</details>"]
    return "\n".join(lines)


def _in_context(a, t: int, layer: int = 0) -> str:
    """Token ``t`` of layer ``layer``'s rows with its neighbours; a named stream's context stays in its sentence."""
    r = a.rows[layer]
    ids, start, end = r.labels_T, max(0, t - CONTEXT_BEFORE), t + 1 + CONTEXT_AFTER
    if r.stream:
        pos = r.positions_T
        start = max(start, t - int(pos[t]))
        later = np.flatnonzero(pos[t + 1: end] == 0)
        end = t + 1 + int(later[0]) if len(later) else end
    before = _decode(a, ids[start: t], layer).replace("\n", "↵")
    after = _decode(a, ids[t + 1: end], layer).replace("\n", "↵")
    return f"…{before}⟦{_label_name(a, int(ids[t]), layer)}⟧{after}…"


def _decode(a, ids: np.ndarray, layer: int = 0) -> str:
    decode = a.task.label_decoder(a.rows[layer].stream)
    if decode is None:
        return " ".join(f"#{int(i)}" for i in ids)
    return decode([int(i) for i in ids])


def _label_name(a, y: int, layer: int = 0) -> str:
    """A class number, or a token made visible (space, newline, a lone non-ASCII byte), decoded on the side
    of the stream that layer ``layer`` routes."""
    if not a.token_labels:
        return str(y)
    decode = a.task.label_decoder(a.rows[layer].stream)
    if decode is None:
        return f"#{y}"
    if type(getattr(a.task, "tokenizer", None)).__name__ == "ByteTokenizer" and y >= 128:
        return f"\\x{y:02x}"
    return decode([y]).translate(_VISIBLE)


def _code(text: str) -> str:
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _training(an: Analysis, figs: dict[str, str]) -> str:
    if not an.history:
        return "## During training\n\nNo metrics.jsonl beside the checkpoint, so no training history."
    step = _step(an)
    lines = ["## During training", "", f"From `{an.history_path}`. Training records hold one batch's routing "
             "(entropy of the last micro-batch); val_ records are the periodic evaluations. The dotted line is "
             "the inspected checkpoint.", "",
             f"![routing during training]({figs['history']})", "",
             "| metric | layer | first logged | at the checkpoint |", "|---|---|---|---|"]
    for key, series in an.history.items():
        L = series.values_SL.shape[1]
        for layer in range(L):
            first, last = _first(series, layer), _at_or_before(series, layer, step)
            name = an.inspected.layer_name(layer) if L == len(an.layers) else str(layer)
            lines.append(f"| {key} | {name} | {first} | {last} |")
    return "\n".join(lines)


def _first(series: Series, layer: int) -> str:
    ok = np.flatnonzero(np.isfinite(series.values_SL[:, layer]))
    return "-" if not len(ok) else f"{series.values_SL[ok[0], layer]:.3f} (step {series.steps_S[ok[0]]})"


def _at_or_before(series: Series, layer: int, step: int | None) -> str:
    ok_S = np.isfinite(series.values_SL[:, layer])
    if step is not None:
        ok_S &= series.steps_S <= step
    ok = np.flatnonzero(ok_S)
    return "-" if not len(ok) else f"{series.values_SL[ok[-1], layer]:.3f} (step {series.steps_S[ok[-1]]})"


def _stability(an: Analysis, figs: dict[str, str]) -> str:
    if an.stability is None:
        return ""
    b = an.other
    lines = ["## Routing stability", "",
             f"A = `{an.inspected.path}` (step {_step(an)}), B = `{b.path}` (step {b.checkpoint.extra.get('step')}), "
             "both run on the same tokens.", "",
             "| layer | tokens | top-1 expert changed | expert set changed | group set changed |",
             "|---|---|---|---|---|"]
    for i, s in enumerate(an.stability):
        lines.append(f"| {an.inspected.layer_name(i)} | {s.num_tokens:,} | {100 * s.top1_changed:.1f}% "
                     f"| {100 * s.set_changed:.1f}% "
                     f"| {100 * s.group_set_changed:.1f}% |")
    lines += ["", "Top-1 = the chosen expert with the largest combine weight.", "",
              f"![routing stability]({figs['stability']})"]
    return "\n".join(lines)
