"""Routing analysis (dualroute.inspect): statistics on layers whose routing is set by hand, then the
whole tool on tiny trained checkpoints: figures, report, --compare, and one-line errors for bad input.

Shapes: B batch, S tokens per example, T tokens, D model dim, E experts, G groups, M experts per group.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dualroute.data import write_mnist_idx, write_token_bin
from dualroute.dispatch import expert_capacity
from dualroute.inspect import (analyse_checkpoint, contingency, coselection, inspect_checkpoint, layer_stats,
                               mutual_information, routing_history, stability, top1)
from dualroute.inspect.cli_hook import inspect_main
from dualroute.inspect.collect import gather, spread
from dualroute.layer import MoEConfig, MoELayer
from dualroute.routing import RouterOptions
from dualroute.losses import router_entropy
from dualroute.models import ModelOutput
from dualroute.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dualroute.train.presets import get_preset, override
from dualroute.train.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_DIGITS = ["model.dim=16", "model.n_heads=2", "model.moe.hidden=8", "model.ffn_hidden=16",
               "train.batch_size=32", "train.eval_batches=2", "train.warmup_steps=1", "train.log_every=1",
               "train.steps=3"]
TINY_LM = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=32", "model.moe.hidden=16",
           "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=4", "train.eval_batches=2",
           "train.log_every=1", "train.warmup_steps=1", "train.steps=3"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ hand-set routing, one layer


class OneLayer(nn.Module):
    """A model around one MoE layer, shaped like the library's models: ``ModelOutput(logits, [aux])``."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_BSD: torch.Tensor) -> ModelOutput:
        y_BSD, aux = self.layer(x_BSD)
        return ModelOutput(y_BSD.sum(-1), [aux])


def class_router_layer(expert_of_class: list[int], **cfg) -> MoELayer:
    """E=4 experts in G=2 groups, K=J=1: the one-hot input of class c goes to ``expert_of_class[c]``.

    Group gate: class c -> group of its expert; expert gate row e: the classes sent to e. Logits are 0 or 20,
    so every choice wins by a margin of 20.
    """
    cfg = {"router": RouterOptions(renormalize=False), **cfg}  # K=1 weighs by probability (no warning)
    layer = MoELayer(MoEConfig(dim=4, hidden=2, num_experts=4, num_groups=2, groups_per_token=1,
                               experts_per_token=1, **cfg))
    with torch.no_grad():
        gate, group_gate = torch.zeros(4, 4), torch.zeros(2, 4)
        for c, e in enumerate(expert_of_class):
            gate[e, c] = group_gate[e // 2, c] = 20.0
        layer.router.gate.weight.copy_(gate)
        layer.router.gate.bias.zero_()
        layer.router.group_gate.weight.copy_(group_gate)
        layer.router.group_gate.bias.zero_()
    return layer.eval()


def class_batches(labels: list[int], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One token per example (S=1): the one-hot vector of its class."""
    y_B = torch.tensor(labels)
    x_BSD = torch.eye(4)[y_B].unsqueeze(1)
    return [(x_BSD[i: i + batch_size], y_B[i: i + batch_size]) for i in range(0, len(labels), batch_size)]


LABELS = [0] * 5 + [1] * 3 + [2] * 2 + [3] * 2  # T = 12


def test_loads_maxvio_entropy_of_hand_set_routing():
    layer = class_router_layer([0, 1, 2, 3])
    (r,), labels_T, positions_T = gather(OneLayer(layer), class_batches(LABELS, 5), is_lm=False)
    s = layer_stats(r)
    assert labels_T.tolist() == LABELS and positions_T.tolist() == [0] * 12
    assert r.expert_ids_TK[:, 0].tolist() == LABELS  # class c -> expert c
    assert r.group_ids_TJ[:, 0].tolist() == [c // 2 for c in LABELS]
    assert s.tokens_per_expert_E.tolist() == [5, 3, 2, 2]
    assert s.tokens_per_group_G.tolist() == [8, 4]
    assert s.usage_GM.tolist() == [[5, 3], [2, 2]]
    assert s.maxvio == pytest.approx(5 / 3 - 1, abs=1e-12)
    assert s.group_maxvio == pytest.approx(8 / 6 - 1, abs=1e-12)
    assert s.dropped_rate == 0.0
    assert s.coselect_EE.tolist() == np.diag([5, 3, 2, 2]).tolist()  # K = 1: nothing chosen together
    x_TD = torch.cat([x for x, _ in class_batches(LABELS, 12)]).squeeze(1)
    _, aux = layer(x_TD)
    assert s.entropy == pytest.approx(router_entropy(aux.routing.probs_TE), rel=1e-6)
    assert s.group_entropy == pytest.approx(router_entropy(aux.routing.group_probs_TG), rel=1e-6)


def test_dropped_rate_with_eval_capacity():
    layer = class_router_layer([0, 1, 2, 3], eval_capacity_factor=0.5)
    (r,), _, _ = gather(OneLayer(layer), class_batches(LABELS, 12), is_lm=False)
    capacity = expert_capacity(12, 1, 4, 0.5)
    want = sum(max(0, n - capacity) for n in [5, 3, 2, 2]) / 12
    assert want > 0 and layer_stats(r).dropped_rate == pytest.approx(want)


def test_coselection_counts_pairs():
    ids_TK = np.array([[0, 1], [1, 0], [0, 2], [3, 1], [2, -1]])  # -1: an empty slot, skipped
    C = coselection(ids_TK, 4)
    assert C.tolist() == [[3, 2, 1, 0],
                          [2, 3, 0, 1],
                          [1, 0, 2, 0],
                          [0, 1, 0, 1]]


def test_mutual_information_exact():
    labels_T = np.repeat(np.arange(4), 3)
    mi, h = mutual_information(contingency(labels_T, labels_T[:, None], 4, 4))  # one-to-one
    assert mi == pytest.approx(math.log2(4), abs=1e-12) and h == pytest.approx(2.0, abs=1e-12)
    eight_T = np.repeat(np.arange(8), 5)
    mi, h = mutual_information(contingency(eight_T, (eight_T % 4)[:, None], 8, 4))  # class c -> expert c % 4
    assert mi == pytest.approx(2.0, abs=1e-12) and h == pytest.approx(3.0, abs=1e-12)
    independent_YE = np.outer([1, 2, 3], [4, 4, 2, 6])
    assert mutual_information(independent_YE)[0] == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_a_routed_layer():
    layer = class_router_layer([0, 1, 2, 3])
    labels = [c for c in range(4) for _ in range(3)]
    (r,), labels_T, _ = gather(OneLayer(layer), class_batches(labels, 4), is_lm=False)
    counts_YE = contingency(labels_T, r.expert_ids_TK, 4, 4)
    assert counts_YE.tolist() == (3 * np.eye(4, dtype=int)).tolist()
    assert mutual_information(counts_YE)[0] == pytest.approx(2.0, abs=1e-12)
    # Level 1: two classes per group, so the group carries exactly one of the two bits.
    assert mutual_information(contingency(labels_T, r.group_ids_TJ, 4, 2))[0] == pytest.approx(1.0, abs=1e-12)


def test_stability_of_hand_set_routers():
    batches = class_batches(LABELS, 5)
    (a,), _, _ = gather(OneLayer(class_router_layer([0, 1, 2, 3])), batches, is_lm=False)
    (same,), _, _ = gather(OneLayer(class_router_layer([0, 1, 2, 3])), batches, is_lm=False)
    (b,), _, _ = gather(OneLayer(class_router_layer([1, 0, 2, 3])), batches, is_lm=False)  # classes 0, 1 swap
    s = stability(a, same)
    assert (s.top1_changed, s.set_changed, s.group_set_changed) == (0.0, 0.0, 0.0)
    s = stability(a, b)
    assert s.top1_changed == s.set_changed == pytest.approx(8 / 12)
    assert s.group_set_changed == 0.0  # both experts are in group 0
    assert s.transitions_EE.tolist() == [[0, 5, 0, 0], [3, 0, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]]


def test_top1_takes_the_largest_weight():
    ids_TK = np.array([[2, 0], [1, 3], [-1, 2]])
    weights_TK = np.array([[0.3, 0.7], [0.6, 0.4], [0.0, 0.5]])
    assert top1(ids_TK, weights_TK).tolist() == [0, 1, 2]


def test_routing_history_per_layer():
    records = [{"step": 0, "val_maxvio": [1.0, 2.0]}, {"step": 10, "maxvio": [0.5, 0.25], "entropy": [1.0, 1.5]},
               {"step": 20, "maxvio": [0.4]}, {"step": 30, "loss": 1.0}]
    h = routing_history(records)
    assert set(h) == {"maxvio", "entropy", "val_maxvio"}
    assert h["maxvio"].steps_S.tolist() == [10, 20]
    np.testing.assert_array_equal(h["maxvio"].values_SL, [[0.5, 0.25], [0.4, np.nan]])


# ------------------------------------------------------------------------------- tiny checkpoints


def _train(out: Path, preset: str, tiny: list[str]) -> Path:
    train(override(get_preset(preset), [*tiny, f"train.out_dir={out}"]), progress=False)
    return latest_checkpoint(out)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory, one_thread) -> Path:
    return _train(tmp_path_factory.mktemp("digits"), "digits-dual", TINY_DIGITS)


@pytest.fixture(scope="module")
def lm_ckpt(tmp_path_factory, one_thread) -> Path:
    return _train(tmp_path_factory.mktemp("lm"), "lm-dual-small", TINY_LM)


def links(report: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def digits_out(digits_ckpt, tmp_path_factory) -> tuple[Path, str]:
    """One full run of the CLI (compared with itself) into a folder that already holds the user's files."""
    out = tmp_path_factory.mktemp("digits_out")
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("keep me")
    (out / "mine.png").write_bytes(b"not ours")
    (out / "report.md.bak").write_text("mine too")
    argv = [str(digits_ckpt), "--compare", str(digits_ckpt), "--batches", "2", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert inspect_main(argv) == 0
    return out, stdout.getvalue()


DIGITS_FIGURES = ["load.png", "group_expert_usage.png", "coselection.png", "class_expert.png", "class_group.png",
                  "training.png", "stability.png"]


def test_digits_report_links_every_figure(digits_out):
    out, _ = digits_out
    for name in DIGITS_FIGURES:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(links(out / "report.md")) == sorted(DIGITS_FIGURES)


def test_user_files_in_the_output_folder_survive(digits_out):
    out, _ = digits_out
    assert (out / "notes" / "mine.txt").read_text() == "keep me"
    assert (out / "mine.png").read_bytes() == b"not ours"
    assert (out / "report.md.bak").read_text() == "mine too"
    assert sorted(p.name for p in out.iterdir()) == sorted([*DIGITS_FIGURES, "report.md", "notes", "mine.png",
                                                            "report.md.bak"])


def test_report_numbers_are_the_analysis_numbers(digits_ckpt, digits_out):
    an = analyse_checkpoint(digits_ckpt, batches=2)
    text = (digits_out[0] / "report.md").read_text(encoding="utf-8")
    B = 32  # batch size of TINY_DIGITS; 2 batches of 8x8 images in 2x2 patches: 17 tokens each
    assert len(an.inspected.labels_T) == 2 * B * 17 and len(an.layers) == 2
    for i, (s, sp) in enumerate(zip(an.layers, an.specialisation)):
        assert int(s.tokens_per_expert_E.sum()) == 2 * B * 17 * 2  # K = 2 rows per token
        assert f"| {i} | {s.num_tokens:,} | {s.maxvio:.3f} | {s.group_maxvio:.3f} |" in text
        assert f"| {i} | {sp.mi_expert:.3f} | {sp.mi_expert_norm:.3f} |" in text
        assert 0 <= sp.mi_expert <= sp.label_entropy + 1e-9


def test_compare_with_itself_changes_nothing(digits_out):
    out, stdout = digits_out
    assert stdout.count("top-1 changed 0.0%") == 2
    text = (out / "report.md").read_text(encoding="utf-8")
    for layer in (0, 1):
        assert f"| {layer} | {2 * 32 * 17:,} | 0.0% | 0.0% | 0.0% |" in text  # every token, none changed


def test_lm_report_has_top_tokens_and_examples(lm_ckpt, tmp_path):
    report = inspect_checkpoint(lm_ckpt, tmp_path, batches=2)
    text = report.read_text(encoding="utf-8")
    assert "### Tokens each expert receives most" in text and "⟦" in text and "I(token id; expert)" in text
    assert sorted(links(report)) == sorted(["load.png", "group_expert_usage.png", "coselection.png",
                                            "token_expert.png", "training.png"])
    for name in links(report):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_compare_with_two_experts_swapped(digits_ckpt, tmp_path):
    """Swap experts 0 and 1 (router rows, correction biases, weights) in the last MoE layer: that layer
    computes the same function, so exactly the tokens that used expert 0 or 1 change, and nothing else."""
    ckpt = load_checkpoint(digits_ckpt)
    state = dict(ckpt.model_state)
    for name, t in state.items():
        if name.startswith(("blocks.1.ffn.experts.", "blocks.1.ffn.router.gate.", "blocks.1.ffn.router.expert_bias")):
            state[name] = t.clone()
            state[name][[0, 1]] = t[[1, 0]]
    swapped = save_checkpoint(tmp_path / "swapped", model_state=state, extra=ckpt.extra, rng=False)
    an = analyse_checkpoint(digits_ckpt, compare=swapped, batches=2)
    assert an.stability[0].top1_changed == an.stability[0].set_changed == 0.0
    r = an.inspected.layers[1]
    has_TE = np.stack([(r.expert_ids_TK == e).any(1) for e in (0, 1)], axis=1)
    s = an.stability[1]
    assert s.top1_changed == pytest.approx(np.isin(top1(r.expert_ids_TK, r.weights_TK), [0, 1]).mean())
    assert s.set_changed == pytest.approx((has_TE.sum(1) == 1).mean())
    assert s.group_set_changed == 0.0 and s.top1_changed > 0


# ------------------------------------------------------------------------------------------- errors


def error_of(argv: list[str], capsys) -> str:
    assert inspect_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert str(missing) in error_of([str(missing), "--out", str(tmp_path / "o")], capsys)
    with pytest.raises(FileNotFoundError, match="nope"):
        analyse_checkpoint(missing)


def test_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert "not a dualroute checkpoint" in error_of([str(foreign), "--out", str(tmp_path / "o")], capsys)
    (foreign / "meta.json").write_text('{"format": "something-else"}')
    assert str(foreign) in error_of([str(foreign), "--out", str(tmp_path / "o")], capsys)


def test_image_data_of_the_wrong_shape(digits_ckpt, tmp_path, capsys):
    mnist = tmp_path / "mnist"
    write_mnist_idx(mnist, np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10)
    err = error_of([str(digits_ckpt), "--data", str(mnist), "--out", str(tmp_path / "o")], capsys)
    assert str(mnist) in err and "1x8x8" in err and "28x28" in err
    assert not (tmp_path / "o").exists()  # nothing written for a failed run


@pytest.mark.parametrize("layout", ["python", "binary"])
def test_cifar10_folders_of_either_version_are_recognised(digits_ckpt, tmp_path, capsys, layout):
    from dualroute.data.image_files import write_cifar10_batch, write_cifar10_bin_batch

    folder = tmp_path / "cifar"
    folder.mkdir()
    pixels, labels = np.zeros((10, 3, 32, 32), np.uint8), np.arange(10)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        if layout == "python":
            write_cifar10_batch(folder / name, pixels, labels)
        else:
            write_cifar10_bin_batch(folder / f"{name}.bin", pixels, labels)
    err = error_of([str(digits_ckpt), "--data", str(folder), "--out", str(tmp_path / "o")], capsys)
    assert "found neither" not in err and "3x32x32" in err  # read as CIFAR-10, refused for its shape


def test_token_ids_outside_the_vocabulary(lm_ckpt, tmp_path, capsys):
    tokens = tmp_path / "tokens.bin"
    write_token_bin(tokens, np.arange(400) % 300)
    err = error_of([str(lm_ckpt), "--data", str(tokens), "--out", str(tmp_path / "o")], capsys)
    assert str(tokens) in err and "256" in err


def test_unwritable_output(digits_ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("a file, not a folder")
    out = tmp_path / "afile" / "x"
    assert str(out) in error_of([str(digits_ckpt), "--out", str(out)], capsys)
    with pytest.raises(ValueError, match="afile"):
        inspect_checkpoint(digits_ckpt, out)


def test_bad_batches(digits_ckpt, tmp_path, capsys):
    assert "batches" in error_of([str(digits_ckpt), "--batches", "0", "--out", str(tmp_path)], capsys)


def test_data_labels_name_the_stdlib_corpus():
    from dualroute.inspect.collect import _data_label
    from dualroute.train.presets import get_preset, override

    assert "standard library" in _data_label(override(get_preset("lm-dual-small"), ["data.kind=stdlib"]), None)
    assert _data_label(get_preset("lm-dual-small"), None) == "the embedded corpus"


# ------------------------------------------------------------------ encoder-decoder (translation) runs

TINY_MT = ["model.dim=32", "model.n_encoder_layers=1", "model.n_decoder_layers=2", "model.n_heads=2",
           "model.max_seq_len=24", "model.ffn_hidden=32", "model.moe.hidden=16", "model.dropout=0.0",
           "data.bpe_vocab_size=300", "task.max_tokens=200", "task.eval_sentences=0", "train.warmup_steps=1",
           "train.eval_every=0", "train.log_every=1", "train.steps=2"]
ENGLISH = ["the", "a", "dog", "cat", "runs", "sleeps", "red", "big"]
GERMAN = {"the": "der", "a": "ein", "dog": "hund", "cat": "katze", "runs": "rennt", "sleeps": "schläft",
          "red": "roter", "big": "großer"}


def write_pairs(path: Path, n: int = 60) -> Path:
    """Word-for-word toy 'translations' of 2-6 words, one TSV line each: sources and targets of many lengths."""
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n):
        words = [ENGLISH[i] for i in rng.integers(0, len(ENGLISH), rng.integers(2, 7))]
        lines.append(" ".join(words) + "\t" + " ".join(GERMAN[w] for w in words))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mt_run(tmp_path_factory, one_thread) -> Path:
    """A tiny mt-dual run with one vocabulary per side: 1 encoder and 2 decoder MoE layers."""
    from dualroute.cli import main as cli_main

    root = tmp_path_factory.mktemp("mt")
    corpus = write_pairs(root / "pairs.tsv")
    args = ["train", "mt-dual", "--out", str(root / "run"), "--quiet", f"data.path={corpus}", *TINY_MT,
            "task.shared_vocab=false"]
    assert cli_main(args) == 0
    return root / "run"


def test_translation_run_is_inspected_per_stream_without_padding(mt_run, tmp_path):
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert inspect_main([str(mt_run), "--out", str(out)]) == 0
    figs = ["load.png", "group_expert_usage.png", "coselection.png", "token_expert_source.png",
            "token_expert_target.png", "training.png"]
    assert sorted(links(out / "report.md")) == sorted(figs)
    for name in figs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC

    an = analyse_checkpoint(mt_run)
    a = an.inspected
    task = a.task
    assert not task.tokenizer.shared and [r.name for r in a.rows] == ["enc 0", "dec 0", "dec 1"]
    pad, bos, K = task.tokenizer.pad_id, task.tokenizer.bos_id, a.moe.experts_per_token
    batches = list(task.eval_batches())
    assert len(batches) <= 8  # all of them are inspected (--batches 8)
    assert any((x[0] == pad).any() for x, _ in batches) and any((x[1] == pad).any() for x, _ in batches)
    src_ids = np.concatenate([x[0][x[0] != pad].numpy() for x, _ in batches])
    tgt_ids = np.concatenate([x[1][x[1] != pad].numpy() for x, _ in batches])
    for layer, ids in zip(range(3), (src_ids, tgt_ids, tgt_ids)):
        s, r = an.layers[layer], a.rows[layer]
        assert s.num_tokens == len(ids) == len(r.labels_T) == len(a.layers[layer].entropy_T)
        assert int(s.tokens_per_expert_E.sum()) == K * len(ids)  # the layer's own count: padding masked there too
        assert np.array_equal(np.sort(r.labels_T), np.sort(ids))
        assert int((r.positions_T == 0).sum()) == sum(len(y) for _, y in batches)  # one start per sentence
    assert a.rows[0].stream == "source" and {r.stream for r in a.rows[1:]} == {"target"}
    assert (a.rows[1].labels_T[a.rows[1].positions_T == 0] == bos).all()  # the target prefix starts at bos

    text = (out / "report.md").read_text(encoding="utf-8")
    for i, name in enumerate(["enc 0", "dec 0", "dec 1"]):
        assert f"| {name} | {an.layers[i].num_tokens:,} | {an.layers[i].maxvio:.3f} |" in text
        assert f"| maxvio | {name} | " in text  # the training history names the layers the same way
    source_part = text.split("Layer enc 0 (source tokens):")[1].split("Layer dec 0")[0]
    target_part = text.split("Layer dec 0 (target tokens):")[1].split("Layer dec 1")[0]
    specials = {"<s>", "</s>", "<unk>"}
    source_tokens, target_tokens = (set(re.findall(r"`([^`|]+)` \d", part)) for part in (source_part, target_part))
    assert source_tokens & set(ENGLISH) and source_tokens <= set(ENGLISH) | specials  # each side decoded with
    assert target_tokens & set(GERMAN.values()) and target_tokens <= set(GERMAN.values()) | specials  # its own
    printed = stdout.getvalue()
    assert f"{len(src_ids):,} source + {len(tgt_ids):,} target tokens" in printed and "  dec 1: maxvio" in printed


def test_translation_run_compared_with_itself_on_data_given_by_path(mt_run, tmp_path):
    pairs = write_pairs(tmp_path / "other.tsv", n=30)
    argv = [str(mt_run), "--data", str(pairs), "--compare", str(mt_run), "--out", str(tmp_path / "out")]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert inspect_main(argv) == 0
    assert stdout.getvalue().count("top-1 changed 0.0%") == 3
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert f"Data: {pairs}, validation split; source stream (layers enc 0)" in text
    assert re.search(r"\| dec 1 \| [\d,]+ \| 0\.0% \| 0\.0% \| 0\.0% \|", text)


def test_spread_takes_batches_from_first_to_last():
    assert spread(iter(range(10)), 3) == [0, 4, 9] and spread(range(11), 3) == [0, 5, 10]
    assert spread(range(3), 8) == [0, 1, 2]  # a text or image task gives exactly what was asked for
