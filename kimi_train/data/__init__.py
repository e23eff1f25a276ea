"""Data: corpus sources, tokenizers, packing and the stateful loader (see loader.py for the layout)."""

from kimi_train.data.loader import (
    Corpus,
    PackedWindows,
    TrainLoader,
    default_cache_dir,
    load_corpus,
    unigram_entropy,
    val_batches,
)
from kimi_train.data.sources import SOURCES, iter_documents, stdlib_files
from kimi_train.data.tokenizer import TOKENIZER_KINDS, ByteTokenizer

__all__ = ["Corpus", "PackedWindows", "TrainLoader", "default_cache_dir", "load_corpus", "unigram_entropy",
           "val_batches", "SOURCES", "iter_documents", "stdlib_files", "TOKENIZER_KINDS", "ByteTokenizer"]
