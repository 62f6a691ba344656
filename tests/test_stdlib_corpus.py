"""The standard-library corpus (data.kind=stdlib): which files it reads, its split by file, and training on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dualroute.data import ByteTokenizer, load_stdlib_corpus, stdlib_files
from dualroute.data import stdlib_corpus as sc
from dualroute.train.presets import get_preset, override

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=16", "train.seq_len=16",
        "train.batch_size=4", "train.eval_batches=2", "train.warmup_steps=1"]


def write(root: Path, rel: str, content: str | bytes = "x = 1\n") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def test_reads_py_files_but_no_tests_packages_build_files_or_help_text(tmp_path):
    kept = ["abc.py", "email/parser.py", "idlelib/editor.py", "lib2to3/fixer_base.py", "unittest/case.py"]
    left_out = ["test/test_os.py", "email/tests/test_x.py", "idlelib/idle_test/test_x.py", "unittest/test/t.py",
                "lib2to3/tests/data/bom.py", "site-packages/pkg/mod.py", "__pycache__/abc.py",
                "config-3.11-x86_64-linux-gnu/python-config.py", "_sysconfigdata__linux.py",
                "pydoc_data/topics.py", ".hidden/mod.py", "README.txt", "email/notes.rst"]
    for rel in kept + left_out:
        write(tmp_path, rel)
    assert stdlib_files(tmp_path) == sorted(kept)


def test_this_pythons_stdlib_has_no_test_folder_and_a_plausible_size():
    files = stdlib_files()
    assert len(files) > 300 and "os.py" in files and "json/decoder.py" in files
    assert not any(set(Path(f).parts) & {"test", "tests", "idle_test", "site-packages", "pydoc_data"} for f in files)
    megabytes = sum(os.path.getsize(sc.stdlib_root() / f) for f in files) / 1e6
    assert 5 < megabytes < 40, megabytes


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    for i in range(300):
        write(root, f"pkg{i % 7}/mod{i}.py", f"# module {i}\nVALUE_{i} = {i}\n")
    write(root, "latin1.py", "caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8
    write(root, "empty.py", "")
    return root


def test_split_is_by_file_disjoint_and_complete(fake_stdlib):
    corpus = load_stdlib_corpus(0.2, root=fake_stdlib)
    assert not set(corpus.train_files) & set(corpus.val_files)
    everything = set(stdlib_files(fake_stdlib)) - {"latin1.py", "empty.py"}
    assert set(corpus.train_files) | set(corpus.val_files) == everything
    assert corpus.skipped == ("latin1.py",)
    assert 30 <= len(corpus.val_files) <= 90  # 20% of 300 files, by hash
    for rel in corpus.val_files:  # each file's text lands in its own split only
        i = int(rel.split("mod")[1].removesuffix(".py"))
        assert f"VALUE_{i} =" in corpus.val and f"VALUE_{i} =" not in corpus.train
    for rel in corpus.train_files:
        i = int(rel.split("mod")[1].removesuffix(".py"))
        assert f"VALUE_{i} =" in corpus.train and f"VALUE_{i} =" not in corpus.val
    assert "1 non-UTF-8 files skipped" in corpus.describe()


def test_split_is_deterministic_and_nested(fake_stdlib):
    first, again = load_stdlib_corpus(0.2, root=fake_stdlib), load_stdlib_corpus(0.2, root=fake_stdlib)
    assert first == again
    assert set(load_stdlib_corpus(0.05, root=fake_stdlib).val_files) < set(first.val_files)
    # The split hangs on the path alone: a pinned hash, so a change of hash function cannot slip through.
    assert sc.hash_share("os.py") == pytest.approx(0.8509487, abs=1e-7)


def test_split_needs_a_file_on_each_side(tmp_path):
    write(tmp_path, "only.py")
    with pytest.raises(ValueError, match="1 train and 0 validation files"):
        load_stdlib_corpus(sc.hash_share("only.py") / 2, root=tmp_path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_stdlib_corpus(1.0, root=tmp_path)


def test_selected_through_the_config_with_clear_errors(tmp_path):
    assert override(get_preset("lm-dual-small"), ["data.kind=stdlib"]).data.kind == "stdlib"
    with pytest.raises(ValueError, match="stdlib"):  # the valid kinds are listed
        override(get_preset("lm-dual-small"), ["data.kind=stdlb"])
    with pytest.raises(ValueError, match="takes no data.path"):
        override(get_preset("lm-dual-small"), ["data.kind=stdlib", f"data.path={tmp_path}"])
    with pytest.raises(ValueError, match=r"'lm' task, which needs a model config among LMConfig.*got ImageConfig"):
        override(get_preset("digits-dual"), ["data.kind=stdlib"])


@pytest.fixture
def few_real_files(monkeypatch):
    """Restrict the corpus to 12 training and 3 validation files of this Python's stdlib (keeps tests fast)."""
    files = stdlib_files()
    train = [f for f in files if not sc.is_validation(f, 0.1)][:12]
    val = [f for f in files if sc.is_validation(f, 0.1)][:3]
    monkeypatch.setattr(sc, "stdlib_files", lambda root=None: train + val)
    return train, val


def test_task_trains_on_training_files_only(few_real_files):
    from dualroute.train.tasks import LMTask

    train, val = few_real_files
    task = LMTask(override(get_preset("lm-dual-small"), ["data.kind=stdlib", *TINY]))
    corpus = load_stdlib_corpus(0.1)
    assert corpus.train_files == tuple(train) and corpus.val_files == tuple(val)
    decode = ByteTokenizer().decode
    assert decode(task.dataset.split_tokens("train").tolist()) == corpus.train
    assert decode(task.dataset.split_tokens("val").tolist()) == corpus.val


def test_bpe_tokenizer_learns_from_training_files(few_real_files):
    pytest.importorskip("tokenizers")
    from dualroute.train.tasks import LMTask

    task = LMTask(override(get_preset("lm-dual-small"), ["data.kind=stdlib", "data.tokenizer=bpe",
                                                   "data.bpe_vocab_size=300", *TINY]))
    corpus = load_stdlib_corpus(0.1)
    assert task.model_config.vocab_size == task.tokenizer.vocab_size == 300
    assert task.tokenizer.decode(task.dataset.split_tokens("val").tolist()) == corpus.val


def test_two_training_steps_from_the_cli(few_real_files, tmp_path, capsys):
    from dualroute.cli import main

    out = tmp_path / "run"
    assert main(["train", "lm-dual-small", "data.kind=stdlib", "train.steps=2", "--out", str(out), "--quiet", *TINY]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["metrics"]["val_loss"] > 0
    assert json.loads((out / "config.json").read_text())["data"]["kind"] == "stdlib"
    err = capsys.readouterr().err
    assert "stdlib corpus" in err and "train 12 files" in err and "validation 3 files" in err
