"""Offline data: text corpora and tokenizers, token files, image datasets and their file formats."""

from dualroute.data.image_files import (
    LabeledImages,
    read_cifar10,
    read_idx,
    read_mnist,
    write_cifar10_batch,
    write_idx,
    write_mnist_idx,
)
from dualroute.data.images import IMAGE_DATASETS, ImageDataset, load_digits_dataset, load_image_dataset
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
    "BPETokenizer", "ByteTokenizer", "CharTokenizer", "CorpusSplit", "IMAGE_DATASETS", "ImageDataset", "LabeledImages",
    "TokenDataset", "Tokenizer", "default_corpus", "encode_array", "load_digits_dataset", "load_image_dataset",
    "load_stdlib_corpus", "load_tokenizer", "read_cifar10", "read_idx", "read_mnist", "read_text", "read_token_bin",
    "stdlib_files", "write_cifar10_batch", "write_idx", "write_mnist_idx", "write_token_bin",
]
