"""Data that needs no download: a byte tokenizer, local text corpora, synthetic long-range tasks, 2-D points.
Importing this package reads no file."""

from vermeil.data.points import DISTRIBUTIONS, paired_sequences, sample_points
from vermeil.data.sampler import SeededSampler
from vermeil.data.synthetic import IGNORE_INDEX, accuracy, mqar, selective_copying
from vermeil.data.text import (
    TextCorpus,
    WindowSampler,
    corpus_fingerprint,
    find_corpus_files,
    load_text_corpus,
    sample_windows,
    sequential_windows,
    stdlib_dir,
)
from vermeil.data.tokenizer import ByteTokenizer, JSONTokenizer, load_tokenizer

__all__ = [
    "DISTRIBUTIONS",
    "IGNORE_INDEX",
    "ByteTokenizer",
    "JSONTokenizer",
    "SeededSampler",
    "TextCorpus",
    "WindowSampler",
    "accuracy",
    "corpus_fingerprint",
    "find_corpus_files",
    "load_text_corpus",
    "load_tokenizer",
    "mqar",
    "paired_sequences",
    "sample_points",
    "sample_windows",
    "selective_copying",
    "sequential_windows",
    "stdlib_dir",
]
