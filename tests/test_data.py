"""Tests for dualroute.data: corpora, tokenizers, token files and datasets, image files and datasets."""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualroute.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    ImageDataset,
    TokenDataset,
    Tokenizer,
    default_corpus,
    load_digits_dataset,
    load_image_dataset,
    load_tokenizer,
    read_cifar10,
    read_idx,
    read_mnist,
    read_text,
    read_token_bin,
    write_cifar10_batch,
    write_idx,
    write_mnist_idx,
    write_token_bin,
)
from dualroute.data.image_files import find_cifar10_batches, write_cifar10_bin_batch
from dualroute.data.pickle_reader import read_batch_pickle

SAMPLE = "The quick brown fox — naïve café, 東京 🚀\n\ttabs and  spaces.\n"


def path_in(path: Path) -> str:
    """A regex matching the path as it appears in an error message."""
    return re.escape(str(path))


# ---- corpus and text files --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus() -> str:
    return default_corpus()


def test_default_corpus_is_sizeable_english(corpus):
    # pydoc_data.topics is ~0.45 MB on CPython 3.11 (the brief hoped for > 1 MB; it is smaller).
    assert len(corpus.encode("utf-8")) > 400_000
    words = re.findall(r"[a-z]+", corpus.lower())
    for common in ("the", "of", "and", "is", "function", "class", "return"):
        assert words.count(common) > 50, common
    assert corpus == default_corpus()


def test_read_text_file_and_folder(tmp_path):
    (tmp_path / "b.md").write_text("bee", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("sea", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == "ay"
    assert read_text(tmp_path) == "ay\n\nbee\n\nsea"


def test_read_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=path_in(tmp_path / "nope")):
        read_text(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ignored.bin").write_text("x")
    with pytest.raises(ValueError, match=path_in(tmp_path / "empty")):
        read_text(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=path_in(tmp_path / "blank.txt")):
        read_text(tmp_path / "blank.txt")
    bad = tmp_path / "docs" / "latin1.txt"
    bad.parent.mkdir()
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=path_in(bad) + ".*UTF-8"):
        read_text(tmp_path / "docs")


# ---- tokenizers -------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert tok.vocab_size == 256 and max(ids) < 256
    assert ids[:3] == list(b"The")
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # half a character decodes, not raises
    with pytest.raises(ValueError, match="256"):
        tok.decode([300])


def test_char_tokenizer_round_trip_and_unknown():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 9 and tok.unk_id == 8
    assert tok.decode(tok.encode("low hello")) == "low hello"
    assert tok.encode("hz") == [3, 8]
    assert tok.decode(tok.encode("hz")) == "h\ufffd"
    with pytest.raises(ValueError, match="9"):
        tok.decode([9])
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("aa")


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    pytest.importorskip("tokenizers", reason="BPETokenizer needs the optional tokenizers package")
    return BPETokenizer.train(corpus[:50_000], vocab_size=400)


def test_bpe_train_encode_decode(bpe, corpus):
    assert 256 < bpe.vocab_size <= 400
    text = corpus[60_000:62_000]
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned
    assert bpe.decode(ids) == text
    assert bpe.decode(bpe.encode(SAMPLE)) == SAMPLE  # unseen characters still round-trip


def test_bpe_rejects_small_vocab():
    pytest.importorskip("tokenizers", reason="BPETokenizer needs the optional tokenizers package")
    with pytest.raises(ValueError, match="100"):
        BPETokenizer.train("some text", vocab_size=100)


def test_bpe_without_tokenizers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        BPETokenizer.train("some text", vocab_size=300)


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizer_save_load(kind, tmp_path, request):
    tok = {"byte": ByteTokenizer, "char": lambda: CharTokenizer.from_text(SAMPLE),
           "bpe": lambda: request.getfixturevalue("bpe")}[kind]()
    assert isinstance(tok, Tokenizer)
    tok.save(tmp_path / "tok" / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.decode(tok.encode(SAMPLE)) == SAMPLE


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=path_in(tmp_path / "none.json")):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match=path_in(tmp_path / "junk.json")):
        load_tokenizer(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text('{"kind": "byte"}')
    with pytest.raises(ValueError, match="format marker"):
        load_tokenizer(tmp_path / "other.json")
    (tmp_path / "kind.json").write_text('{"format": "dualroute-tokenizer", "kind": "wordpiece"}')
    with pytest.raises(ValueError, match="wordpiece"):
        load_tokenizer(tmp_path / "kind.json")


# ---- token dataset ----------------------------------------------------------------------------------

def test_token_dataset_split_is_contiguous_val_last():
    data = TokenDataset(np.arange(1000, dtype=np.int64), val_fraction=0.1)
    assert data.n_train == 900
    np.testing.assert_array_equal(data.split_tokens("train"), np.arange(900))
    np.testing.assert_array_equal(data.split_tokens("val"), np.arange(900, 1000))


def test_get_batch_shapes_shift_and_range():
    data = TokenDataset(np.arange(1000, dtype=np.uint16), val_fraction=0.2)
    x_BS, y_BS = data.get_batch("train", 6, 16, torch.Generator().manual_seed(0))
    assert x_BS.shape == y_BS.shape == (6, 16) and x_BS.dtype == y_BS.dtype == torch.int64
    # Tokens are their own positions, so each row must be a contiguous run and y = x + 1.
    assert torch.equal(y_BS, x_BS + 1)
    assert torch.equal(x_BS - x_BS[:, :1], torch.arange(16).expand(6, 16))
    assert int(y_BS.max()) < 800
    x_val, y_val = data.get_batch("val", 4, 8, torch.Generator().manual_seed(0))
    assert int(x_val.min()) >= 800 and int(y_val.max()) < 1000


def test_get_batch_is_deterministic_per_seed():
    data = TokenDataset(np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16))
    first = data.get_batch("train", 8, 32, torch.Generator().manual_seed(7))
    again = data.get_batch("train", 8, 32, torch.Generator().manual_seed(7))
    other = data.get_batch("train", 8, 32, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_get_batch_errors():
    data = TokenDataset(np.arange(100, dtype=np.uint16), val_fraction=0.1)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="batch_size=0"):
        data.get_batch("train", 0, 4, gen)
    with pytest.raises(ValueError, match="seq_len=-1"):
        data.get_batch("train", 2, -1, gen)
    with pytest.raises(ValueError, match="val split has 10 tokens.*11"):
        data.get_batch("val", 2, 10, gen)
    with pytest.raises(ValueError, match="'test'"):
        data.get_batch("test", 2, 4, gen)
    with pytest.raises(ValueError, match="1.5"):
        TokenDataset(np.arange(10), val_fraction=1.5)
    with pytest.raises(ValueError, match="1-D"):
        TokenDataset(np.zeros((2, 5), dtype=np.int64))


def test_iter_eval_batches_walks_in_order():
    data = TokenDataset(np.arange(101, dtype=np.int64), val_fraction=0.0)
    batches = list(data.iter_eval_batches("train", batch_size=3, seq_len=10))
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]  # 10 windows of 10 + the next token
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    assert torch.equal(x_all.flatten(), torch.arange(100))
    assert torch.equal(y_all.flatten(), torch.arange(1, 101))
    assert len(list(data.iter_eval_batches("train", 3, 10, max_batches=2))) == 2
    with pytest.raises(ValueError, match="max_batches"):
        list(data.iter_eval_batches("train", 3, 10, max_batches=0))


def test_iter_eval_batches_spreads_a_limited_evaluation_over_the_whole_split():
    data = TokenDataset(np.arange(1001, dtype=np.int64), val_fraction=0.0)  # 100 windows of 10
    x_BS = torch.cat([x for x, _ in data.iter_eval_batches("train", 2, 10, max_batches=2)])
    assert x_BS[:, 0].tolist() == [0, 330, 660, 990]  # first and last window, evenly between
    assert len({int(v) for v in x_BS.flatten()}) == x_BS.numel()  # windows never overlap
    with pytest.raises(ValueError, match="max_batches"):
        list(data.iter_eval_batches("train", 3, 10, max_batches=0))


def test_token_dataset_from_parts_keeps_the_parts_apart():
    data = TokenDataset.from_parts(np.arange(50, dtype=np.uint16), np.arange(50, 60, dtype=np.uint16))
    assert data.n_train == 50 and data.val_fraction == pytest.approx(1 / 6)
    np.testing.assert_array_equal(data.split_tokens("val"), np.arange(50, 60))
    x_BS, y_BS = data.get_batch("val", 8, 4, torch.Generator().manual_seed(0))
    assert int(x_BS.min()) >= 50 and int(y_BS.max()) < 60
    with pytest.raises(ValueError, match="n_train must be in \\[0, 10\\], got 11"):
        TokenDataset(np.arange(10), n_train=11)


def test_token_dataset_from_text():
    data = TokenDataset.from_text(SAMPLE * 20, ByteTokenizer(), val_fraction=0.25)
    assert data.tokens.dtype == np.uint16
    assert ByteTokenizer().decode(data.tokens.tolist()) == SAMPLE * 20


# ---- token .bin files -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_token_bin_round_trip(tmp_path, dtype):
    ids = np.random.default_rng(1).integers(0, 60000, 777)
    write_token_bin(tmp_path / "out" / "train.bin", ids, dtype=dtype)
    tokens = read_token_bin(tmp_path / "out" / "train.bin", dtype=dtype, vocab_size=60000)
    assert isinstance(tokens, np.memmap) and tokens.dtype == dtype
    np.testing.assert_array_equal(tokens, ids)
    x_BS, _ = TokenDataset(tokens).get_batch("train", 2, 5, torch.Generator().manual_seed(0))
    assert x_BS.dtype == torch.int64


def test_token_bin_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=path_in(tmp_path / "none.bin")):
        read_token_bin(tmp_path / "none.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=path_in(tmp_path / "empty.bin") + ".*empty"):
        read_token_bin(tmp_path / "empty.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ValueError, match=path_in(tmp_path / "odd.bin") + ".*3 bytes.*multiple"):
        read_token_bin(tmp_path / "odd.bin")
    write_token_bin(tmp_path / "big.bin", [1, 2, 500])
    with pytest.raises(ValueError, match=path_in(tmp_path / "big.bin") + r".*500.*\[0, 256\)"):
        read_token_bin(tmp_path / "big.bin", vocab_size=256)
    with pytest.raises(ValueError, match="70000"):
        write_token_bin(tmp_path / "w.bin", [1, 70000])
    with pytest.raises(ValueError, match="1-D"):
        write_token_bin(tmp_path / "w.bin", np.zeros((2, 2), dtype=np.int64))


# ---- MNIST ------------------------------------------------------------------------------------------

def mnist_arrays(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_round_trip(tmp_path, compress, split):
    pixels, labels = mnist_arrays()
    image_path, label_path = write_mnist_idx(tmp_path, pixels, labels, split=split, compress=compress)
    assert image_path.name.startswith("train-images" if split == "train" else "t10k-images")
    assert (image_path.suffix == ".gz") == compress
    images_N1HW, labels_N = read_mnist(tmp_path, split)
    assert images_N1HW.shape == (12, 1, 28, 28) and images_N1HW.dtype == torch.float32
    assert labels_N.dtype == torch.int64
    assert torch.equal(images_N1HW, torch.from_numpy(pixels[:, None].astype(np.float32) / 255))
    assert torch.equal(labels_N, torch.from_numpy(labels.astype(np.int64)))


def test_idx_header_layout(tmp_path):
    pixels, _ = mnist_arrays(n=3)
    raw = write_idx(tmp_path / "x-idx3-ubyte", pixels).read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert raw[4:16] == (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert len(raw) == 16 + 3 * 28 * 28
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte", ndim=3), pixels)


def test_mnist_torchvision_layout(tmp_path):
    pixels, labels = mnist_arrays(n=4)
    write_mnist_idx(tmp_path / "MNIST" / "raw", pixels, labels, compress=True)
    assert len(read_mnist(tmp_path).labels_N) == 4


def test_mnist_missing_file_names_expected_paths(tmp_path):
    pixels, labels = mnist_arrays(n=4)
    image_path, label_path = write_mnist_idx(tmp_path, pixels, labels)
    label_path.unlink()
    with pytest.raises(FileNotFoundError, match=path_in(tmp_path / "train-labels-idx1-ubyte.gz")):
        read_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match=path_in(tmp_path / "t10k-images-idx3-ubyte")):
        read_mnist(tmp_path, "test")


def corrupt(path: Path, edit) -> None:
    """Apply `edit` to the decompressed bytes of an IDX file, keeping its compression."""
    compressed = path.suffix == ".gz"
    raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
    raw = edit(raw)
    path.write_bytes(gzip.compress(raw) if compressed else raw)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("which", ["images", "labels"])
def test_mnist_bad_magic(tmp_path, compress, which):
    paths = dict(zip(["images", "labels"], write_mnist_idx(tmp_path, *mnist_arrays(), compress=compress)))
    corrupt(paths[which], lambda raw: b"\x00\x00\x08\x02" + raw[4:])
    with pytest.raises(ValueError, match=path_in(paths[which]) + ".*magic 0x00000802"):
        read_mnist(tmp_path)


@pytest.mark.parametrize("cut", [1, 500, 10_000])
def test_mnist_truncated(tmp_path, cut):
    image_path, _ = write_mnist_idx(tmp_path, *mnist_arrays(), compress=True)
    corrupt(image_path, lambda raw: raw[:-cut])
    with pytest.raises(ValueError, match=path_in(image_path) + ".*truncated"):
        read_mnist(tmp_path)


def test_mnist_header_only_truncated(tmp_path):
    _, label_path = write_mnist_idx(tmp_path, *mnist_arrays())
    corrupt(label_path, lambda raw: raw[:6])
    with pytest.raises(ValueError, match=path_in(label_path) + ".*truncated.*header"):
        read_mnist(tmp_path)


def test_mnist_trailing_bytes(tmp_path):
    _, label_path = write_mnist_idx(tmp_path, *mnist_arrays())
    corrupt(label_path, lambda raw: raw + b"\x00")
    with pytest.raises(ValueError, match=path_in(label_path) + ".*longer"):
        read_mnist(tmp_path)


def test_mnist_count_mismatch(tmp_path):
    pixels, labels = mnist_arrays(n=5)
    write_mnist_idx(tmp_path, pixels, labels)
    label_path = write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])
    with pytest.raises(ValueError, match=r"5 images.*" + path_in(label_path) + ".*4 labels"):
        read_mnist(tmp_path)


def test_mnist_bad_gzip(tmp_path):
    image_path, _ = write_mnist_idx(tmp_path, *mnist_arrays(), compress=True)
    image_path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=path_in(image_path) + ".*gzip"):
        read_mnist(tmp_path)


# ---- CIFAR-10 ---------------------------------------------------------------------------------------

CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def cifar_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n)


def write_cifar_folder(folder: Path, n: int = 3,
                       layout: str = "python") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    arrays = {name: cifar_arrays(n, seed) for seed, name in enumerate(CIFAR_NAMES)}
    for name, (pixels, labels) in arrays.items():
        if layout == "python":
            write_cifar10_batch(folder / name, pixels, labels)
        else:
            write_cifar10_bin_batch(folder / (name + ".bin"), pixels, labels)
    return arrays


@pytest.mark.parametrize("subfolder, layout", [("", "python"), ("cifar-10-batches-py", "python"),
                                               ("", "binary"), ("cifar-10-batches-bin", "binary")])
def test_cifar10_round_trip(tmp_path, subfolder, layout):
    arrays = write_cifar_folder(tmp_path / subfolder, layout=layout)
    images, labels = read_cifar10(tmp_path, "train")
    assert images.shape == (15, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    pixels = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(images, torch.from_numpy(pixels.astype(np.float32) / 255))
    assert labels.tolist() == sum((arrays[f"data_batch_{i}"][1].tolist() for i in range(1, 6)), [])
    test_images, test_labels = read_cifar10(tmp_path, "test")
    assert torch.equal(test_images, torch.from_numpy(arrays["test_batch"][0].astype(np.float32) / 255))
    assert test_labels.tolist() == arrays["test_batch"][1].tolist()
    assert find_cifar10_batches(tmp_path, "test") == (layout, [tmp_path / subfolder / (
        "test_batch" + (".bin" if layout == "binary" else ""))])


def test_cifar10_batch_layout(tmp_path):
    pixels, labels = cifar_arrays(2, 0)
    path = write_cifar10_batch(tmp_path / "b", pixels, labels)
    with open(path, "rb") as f:  # the stdlib's pickle checks the test's own fixture writer
        batch = pickle.load(f, encoding="bytes")
    assert batch[b"data"].shape == (2, 3072) and batch[b"labels"] == labels.tolist()
    assert batch[b"data"][0, 1024] == pixels[0, 1, 0, 0]  # channel-major rows, as published


def test_cifar10_binary_batch_layout(tmp_path):
    pixels, labels = cifar_arrays(2, 0)
    raw = write_cifar10_bin_batch(tmp_path / "b.bin", pixels, labels).read_bytes()
    assert len(raw) == 2 * 3073  # per image: 1 label byte, then 3072 pixel bytes
    assert raw[0] == labels[0] and raw[3073] == labels[1]
    assert raw[1 + 1024] == pixels[0, 1, 0, 0] and raw[3073 + 1:3073 + 3073] == pixels[1].tobytes()
    with pytest.raises(ValueError, match="labels are 0-9"):
        write_cifar10_bin_batch(tmp_path / "c.bin", pixels, np.array([0, 10]))


def test_cifar10_missing_batch(tmp_path):
    write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=path_in(tmp_path / "data_batch_3")):
        read_cifar10(tmp_path)
    with pytest.raises(ValueError, match="'valid'"):
        read_cifar10(tmp_path, "valid")
    write_cifar_folder(tmp_path / "bin", layout="binary")
    (tmp_path / "bin" / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"binary version.*" + path_in(tmp_path / "bin" / "test_batch.bin")):
        read_cifar10(tmp_path / "bin", "test")


def test_cifar10_folder_without_batches(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "data_batch_1.txt").write_text("no")
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batches in " + path_in(tmp_path)
                       + r".*python version.*binary version"):
        read_cifar10(tmp_path)


def test_cifar10_picks_a_complete_layout(tmp_path):
    py = write_cifar_folder(tmp_path / "cifar-10-batches-py", n=2)
    binary = write_cifar_folder(tmp_path / "cifar-10-batches-bin", n=4, layout="binary")
    assert read_cifar10(tmp_path, "test").labels_N.tolist() == binary["test_batch"][1].tolist()  # binary first
    (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()  # now only the python one is complete
    assert find_cifar10_batches(tmp_path, "test")[0] == "python"
    assert read_cifar10(tmp_path, "test").labels_N.tolist() == py["test_batch"][1].tolist()


@pytest.mark.parametrize("content, message", [
    (b"", "not a whole, nonzero number of 3073-byte records"),
    (bytes(3073 * 2 - 1), "not a whole, nonzero number of 3073-byte records"),
    (bytes(3073) + bytes([12]) + bytes(3072), "record 1 has label 12, not a CIFAR-10 class"),
])
def test_cifar10_bad_binary_batches(tmp_path, content, message):
    write_cifar_folder(tmp_path, layout="binary")
    (tmp_path / "test_batch.bin").write_bytes(content)
    with pytest.raises(ValueError, match=path_in(tmp_path / "test_batch.bin") + ".*" + message):
        read_cifar10(tmp_path, "test")


# -- the python version's pickles, read without unpickling

def cifar_batch(n: int, seed: int = 0, numpy_labels: bool = False) -> dict:
    pixels, labels = cifar_arrays(n, seed)
    return {b"batch_label": b"testing batch 1 of 1", b"data": pixels.reshape(n, -1),
            b"labels": list(labels) if numpy_labels else labels.tolist(),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def assert_same_batch(got: dict, batch: dict) -> None:
    assert sorted(got) == sorted(batch)
    assert got[b"data"].dtype == np.uint8 and np.array_equal(got[b"data"], batch[b"data"])
    assert got[b"labels"] == batch[b"labels"] and got[b"filenames"] == batch[b"filenames"]
    assert got[b"batch_label"] == batch[b"batch_label"]


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("numpy_labels", [False, True])
def test_batch_pickle_parser_matches_every_protocol(protocol, numpy_labels):
    batch = cifar_batch(4, numpy_labels=numpy_labels)
    assert_same_batch(read_batch_pickle(pickle.dumps(batch, protocol=protocol)), batch)
    arrays = {"fortran": np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4)),
              "big_endian": np.arange(6, dtype=">i4").reshape(2, 3), "strided": np.arange(8.0)[::2],
              "empty": np.zeros((0, 3072), np.uint8), "shared": [b"x", b"x"], "bools": (True, False, None)}
    got = read_batch_pickle(pickle.dumps(arrays, protocol=protocol))
    for key in ("fortran", "big_endian", "strided", "empty"):
        assert got[key].shape == arrays[key].shape and np.array_equal(got[key], arrays[key]), key
        assert got[key].dtype.kind == arrays[key].dtype.kind, key
    assert got["fortran"].flags.f_contiguous and got["shared"] == [b"x", b"x"] and got["bools"] == (True, False, None)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar10_reads_batches_of_every_protocol(tmp_path, protocol):
    pixels, labels = cifar_arrays(3, 7)
    for name in CIFAR_NAMES:
        write_cifar10_batch(tmp_path / name, pixels, labels, protocol=protocol)
    images, got_labels = read_cifar10(tmp_path, "test")
    assert torch.equal(images, torch.from_numpy(pixels.astype(np.float32) / 255))
    assert got_labels.tolist() == labels.tolist()


def python2_batch_pickle(batch: dict) -> bytes:
    """The batch as Python 2's cPickle.dump(batch, f, 2) wrote the published files: str (bytes) keys as
    SHORT_BINSTRING, the pixels as one BINSTRING, numpy.core.multiarray._reconstruct, memo entries past
    255 as LONG_BINPUT, lists appended and dicts set in runs of 1000."""
    memo = iter(range(1, 1 << 30))

    def put() -> bytes:
        i = next(memo)
        return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def string(b: bytes) -> bytes:
        head = b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))
        return head + b + put()

    def integer(v: int) -> bytes:
        return (b"K" + bytes([v]) if 0 <= v < 256 else b"M" + struct.pack("<H", v) if 0 <= v < 65536
                else b"J" + struct.pack("<i", v))

    def in_runs(parts: list[bytes], closer: bytes) -> list[bytes]:
        return [b"(" + b"".join(parts[i:i + 1000]) + closer for i in range(0, len(parts), 1000)]

    def value(v) -> list[bytes]:
        if isinstance(v, bytes):
            return [string(v)]
        if isinstance(v, list):
            return [b"]", put(), *in_runs([b"".join(value(x)) for x in v], b"e")]
        if isinstance(v, int):
            return [integer(v)]
        n, width = v.shape
        return [b"cnumpy.core.multiarray\n_reconstruct\n", put(), b"cnumpy\nndarray\n", put(),
                b"K\x00\x85", put(), string(b"b"), b"\x87", put(), b"R", put(),
                b"(K\x01", integer(n), integer(width), b"\x86", put(), b"cnumpy\ndtype\n", put(),
                string(b"u1"), b"K\x00K\x01\x87", put(), b"R", put(),
                b"(K\x03", string(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", put(), b"b",
                b"\x89", string(v.tobytes()), b"t", put(), b"b"]

    head = b"\x80\x02}" + put()
    items = [string(k) + b"".join(value(v)) for k, v in batch.items()]
    return b"".join([head, *in_runs(items, b"u"), b"."])


def test_batch_pickle_parser_reads_python2_batches():
    batch = cifar_batch(1200)  # > 255 memo entries, more than one APPENDS run
    raw = python2_batch_pickle(batch)
    out = io.StringIO()
    pickletools.dis(raw, out)  # a well-formed pickle (dis checks the stack and the memo), never loaded
    assert "LONG_BINPUT" in out.getvalue() and "'numpy.core.multiarray _reconstruct'" in out.getvalue()
    assert_same_batch(read_batch_pickle(raw), batch)


def test_cifar10_never_unpickles(tmp_path, monkeypatch):
    arrays = write_cifar_folder(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(python2_batch_pickle(cifar_batch(3, seed=1)))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was asked to unpickle")

    for name in ("Unpickler", "_Unpickler", "load", "loads", "_load", "_loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    images, labels = read_cifar10(tmp_path, "test")
    assert labels.tolist() == arrays["test_batch"][1].tolist()
    assert read_cifar10(tmp_path, "train").labels_N[3:6].tolist() == cifar_arrays(3, 1)[1].tolist()


class _Exploit:
    def __reduce__(self):
        return (sys.exit, (3,))


def _leave_a_mark(path: str) -> None:
    Path(path).write_text("ran")


class _MarkingExploit:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (_leave_a_mark, (str(self.path),))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('sys').exit(3)",))


def _unpatched(content: bytes, old: bytes, new: bytes) -> bytes:
    assert content.count(old) == 1
    return content.replace(old, new)


_ARRAY_P2 = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)


@pytest.mark.parametrize("content, message", [
    (b"definitely not a pickle", "not a CIFAR-10 pickle"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "missing key 'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"\(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 integer labels"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[0], [1, 2]]}), "2 integer labels"),
    (pickle.dumps([1, 2, 3]), "holds a list"),
    (pickle.dumps({b"data": _Exploit(), b"labels": []}), "refusing to load sys.exit"),
    (pickle.dumps({b"data": _EvalExploit(), b"labels": []}), "refusing to load builtins.eval"),
    (pickle.dumps({b"data": _EvalExploit(), b"labels": []}, protocol=2), "refusing to load __builtin__.eval"),
    (b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R.", r"refusing to load os.system \(GLOBAL at byte 2"),
    (b"\x80\x02N)\x81.", "refusing opcode NEWOBJ at byte 4"),
    (b"Pfoo\n.", "refusing opcode PERSID"),
    (b"\x80\x02G?\xf0\x00\x00\x00\x00\x00\x00.", "refusing opcode BINFLOAT"),
    (b"\x80\x02\xff.", "not a CIFAR-10 pickle.*opcode b'\\\\xff' unknown"),
    (_ARRAY_P2[:len(_ARRAY_P2) // 2], "not a CIFAR-10 pickle.*(remain|exhausted)"),
    (_ARRAY_P2[:-1], "not a CIFAR-10 pickle.*exhausted before seeing STOP"),
    (_unpatched(_ARRAY_P2, b"K\x02M\x00\x0c\x86", b"K\x03M\x00\x0c\x86"), r"needs 9216 bytes of data, found 6144"),
    (_unpatched(_ARRAY_P2, b"X\x02\x00\x00\x00u1", b"X\x02\x00\x00\x00O8"), "refusing dtype 'O8'"),
    (pickle.dumps({b"data": np.zeros((2, 3072), object), b"labels": [0, 1]}), "refusing dtype 'O8'"),
    (pickle.dumps({b"data": np.zeros(2, [("a", "u1")]), b"labels": [0, 1]}), "refusing dtype 'V1'"),
    (b"\x80\x02cnumpy\nndarray\n)R.", "refusing to call numpy.ndarray"),
    (b"\x80\x02(N.", "not a CIFAR-10 pickle.*STOP.*open MARK"),
    (b"\x80\x02e.", "not a CIFAR-10 pickle.*APPENDS at byte 2: no MARK"),
    (b"\x80\x02h\x05.", "memo entry 5 was never stored"),
])
def test_cifar10_bad_batches(tmp_path, content, message):
    write_cifar_folder(tmp_path)
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(ValueError, match=path_in(tmp_path / "test_batch") + ".*" + message):
        read_cifar10(tmp_path, "test")


def test_cifar10_refusal_runs_nothing(tmp_path):
    marker = tmp_path / "ran.txt"
    write_cifar_folder(tmp_path)
    for protocol in (0, 2, 5):
        (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _MarkingExploit(marker)}, protocol=protocol))
        with pytest.raises(ValueError, match=r"refusing to load (tests\.)?test_data\._leave_a_mark"):
            read_cifar10(tmp_path, "test")
    assert not marker.exists()


# ---- digits and the image dataset -------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits dataset needs scikit-learn")
    return load_digits_dataset()


def test_digits_shape_and_classes(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert labels.dtype == torch.int64 and sorted(labels.unique().tolist()) == list(range(10))


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_dataset()


def test_image_dataset_split_and_stats(digits):
    data = ImageDataset(*digits, val_fraction=0.2, seed=3)
    train, val = data.split_index("train"), data.split_index("val")
    assert len(val) == round(1797 * 0.2) and len(train) + len(val) == 1797
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1797))
    assert torch.equal(val, ImageDataset(*digits, val_fraction=0.2, seed=3).val_index)
    assert not torch.equal(val, ImageDataset(*digits, val_fraction=0.2, seed=4).val_index)
    assert data.num_classes == 10 and data.image_shape == (1, 8, 8)
    x_train = torch.cat([x for x, _ in data.iter_batches("train", 500)])
    assert abs(float(x_train.mean())) < 1e-5 and abs(float(x_train.std()) - 1) < 1e-3


def test_image_dataset_batches(digits):
    data = ImageDataset(*digits, val_fraction=0.1)
    x_BCHW, y_B = data.get_batch("train", 16, torch.Generator().manual_seed(0))
    assert x_BCHW.shape == (16, 1, 8, 8) and y_B.shape == (16,) and y_B.dtype == torch.int64
    x_again, y_again = data.get_batch("train", 16, torch.Generator().manual_seed(0))
    assert torch.equal(x_BCHW, x_again) and torch.equal(y_B, y_again)
    batches = list(data.iter_batches("val", 64))
    assert [len(y) for _, y in batches] == [64, 64, 52]
    assert torch.equal(torch.cat([y for _, y in batches]), digits.labels_N[data.val_index])
    raw = ImageDataset(*digits, normalize=False)
    assert torch.equal(next(raw.iter_batches("val", 4))[0], digits.images_NCHW[raw.val_index[:4]])


def test_image_dataset_errors():
    images, labels = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
    data = ImageDataset(images, labels, val_fraction=0.0)
    with pytest.raises(ValueError, match="val split is empty"):
        data.get_batch("val", 2, torch.Generator())
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        list(data.iter_batches("train", 0))
    with pytest.raises(ValueError, match="'test'"):
        data.split_index("test")
    with pytest.raises(ValueError, match=r"\(10,\).*\(9,\)"):
        ImageDataset(images, labels[:9])
    with pytest.raises(ValueError, match="4-D"):
        ImageDataset(images[:, 0], labels)
    with pytest.raises(ValueError, match="num_classes=2"):
        ImageDataset(images, labels, num_classes=2)
    with pytest.raises(ValueError, match="-0.5"):
        ImageDataset(images, labels, val_fraction=-0.5)


def test_load_image_dataset_digits(digits):
    data = load_image_dataset("digits")
    assert len(data.labels_N) == 1797 and data.num_classes == 10


def test_load_image_dataset_from_files(tmp_path):
    write_mnist_idx(tmp_path / "mnist", *mnist_arrays(n=20))
    mnist = load_image_dataset("mnist", tmp_path / "mnist", val_fraction=0.25)
    assert mnist.image_shape == (1, 28, 28) and len(mnist.val_index) == 5 and mnist.num_classes == 10
    write_cifar_folder(tmp_path / "cifar" / "cifar-10-batches-py")
    assert load_image_dataset("cifar10", tmp_path / "cifar").image_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="'imagenet'.*digits, mnist, cifar10"):
        load_image_dataset("imagenet")
    with pytest.raises(ValueError, match="pass path="):
        load_image_dataset("mnist")
