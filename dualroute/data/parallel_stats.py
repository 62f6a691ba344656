"""Token and bucketing statistics of a parallel corpus: ``python -m dualroute.data.parallel_stats PATH`` (or
``--g2p``) loads it, trains its tokenizer on the train split and prints what docs/translation.md quotes."""

from __future__ import annotations

from typing import Sequence

from dualroute.data.parallel import (
    UNK_ID,
    BucketedPairs,
    PairTokenizer,
    ParallelSplits,
    load_parallel,
    train_pair_tokenizer,
)


def describe_corpus(splits: ParallelSplits, tokenizer: PairTokenizer, max_tokens: int,
                    max_len: int | None) -> list[str]:
    """Lines of token statistics per split and of the train split's bucketing at ``max_tokens``."""
    lines = [splits.description, repr(tokenizer)]
    parts = [("train", splits.train), ("val", splits.val)] + ([("test", splits.test)] if splits.test else [])
    for name, pairs in parts:
        src = tokenizer.encode_src_batch([s for s, _ in pairs])
        tgt = tokenizer.encode_tgt_batch([t for _, t in pairs])
        unk = sum(ids.count(UNK_ID) for ids in src + tgt) / max(1, sum(map(len, src + tgt)))
        stats = [f"{side} tokens mean {sum(map(len, ids)) / len(ids):.1f} max {max(map(len, ids))}"
                 for side, ids in (("source", src), ("target", tgt))]
        lines.append(f"{name}: {len(pairs):,} pairs, {'; '.join(stats)}; <unk> {100 * unk:.2f}%")
        if name == "train":
            data = BucketedPairs(src, tgt, max_tokens, max_len=max_len)
            epoch = data.eval_batches()
            lines.append(f"train buckets at max_tokens={max_tokens}, max_len={max_len}: {len(epoch):,} batches "
                         f"per epoch, {len(data) / len(epoch):.1f} pairs per batch, "
                         f"{100 * data.padding_fraction(epoch):.1f}% "
                         f"padding, {data.n_skipped:,} pairs skipped as too long")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m dualroute.data.parallel_stats",
                                     description="Load parallel text (or CMUdict G2P), train its tokenizer and "
                                                 "print token and bucketing statistics.")
    parser.add_argument("path", nargs="?", help="folder, 'SRC,TGT' files or a .tsv file (omit with --g2p)")
    parser.add_argument("--g2p", action="store_true", help="CMUdict grapheme-to-phoneme pairs (char tokenizer)")
    parser.add_argument("--src-lang", default="en")
    parser.add_argument("--tgt-lang", default="de")
    parser.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary per tokenizer (default 8000)")
    parser.add_argument("--unshared", action="store_true", help="one BPE vocabulary per side")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=None)
    args = parser.parse_args(argv)
    if args.g2p == (args.path is not None):
        parser.error("give a PATH or --g2p (not both)")
    start = time.perf_counter()
    if args.g2p:
        from dualroute.data.g2p import load_cmudict_g2p

        splits = load_cmudict_g2p()
    else:
        splits = load_parallel(args.path, args.src_lang, args.tgt_lang)
    loaded = time.perf_counter()
    tokenizer = train_pair_tokenizer(splits, args.vocab, shared=not args.unshared,
                                     kind="char" if args.g2p else "bpe")
    trained = time.perf_counter()
    for line in describe_corpus(splits, tokenizer, args.max_tokens, args.max_len):
        print(line)
    print(f"time: load {loaded - start:.2f} s, tokenizer training {trained - loaded:.2f} s, "
          f"encoding and bucketing {time.perf_counter() - trained:.2f} s")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
