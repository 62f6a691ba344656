"""Offline data: text corpora and tokenizers, parallel text and G2P pairs, token files, image datasets and their
file formats."""

from dualroute.data.image_files import (
    LabeledImages,
    read_cifar10,
    read_idx,
    read_mnist,
    write_cifar10_batch,
    write_idx,
    write_mnist_idx,
)
from dualroute.data.g2p import load_cmudict_g2p
from dualroute.data.images import IMAGE_DATASETS, ImageDataset, load_digits_dataset, load_image_dataset
from dualroute.data.parallel import (
    BucketedPairs,
    PairTokenizer,
    ParallelSplits,
    collate_pairs,
    load_parallel,
    train_pair_tokenizer,
)
from dualroute.data.stdlib_corpus import CorpusSplit, load_stdlib_corpus, stdlib_files
from dualroute.data.text import (
    TokenDataset,
    default_corpus,
    encode_array,
    read_text,
    read_token_bin,
    write_token_bin,
)
from dualroute.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "BPETokenizer", "BucketedPairs", "ByteTokenizer", "CharTokenizer", "CorpusSplit", "IMAGE_DATASETS", "ImageDataset",
    "LabeledImages",
    "PairTokenizer", "ParallelSplits", "collate_pairs", "load_cmudict_g2p", "load_parallel", "train_pair_tokenizer",
    "TokenDataset", "Tokenizer", "default_corpus", "encode_array", "load_digits_dataset", "load_image_dataset",
    "load_stdlib_corpus", "load_tokenizer", "read_cifar10", "read_idx", "read_mnist", "read_text", "read_token_bin",
    "stdlib_files", "write_cifar10_batch", "write_idx", "write_mnist_idx", "write_token_bin",
]
