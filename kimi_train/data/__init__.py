"""Data: sources, tokenizers, prepared token datasets, packing and the stateful loader.

kimi-train-prepare (prepare.py) writes a source as Megatron-format shards; training opens them
memory-mapped (dataset.py, indexed.py) and reads them in a global order (order.py, loader.py).
Nothing here imports torch at import time (the prepare workers import this package).
"""

from kimi_train.data.loader import (
    Corpus,
    PackedWindows,
    TrainData,
    TrainLoader,
    build_data,
    default_cache_dir,
    load_corpus,
    unigram_entropy,
    val_batches,
)
from kimi_train.data.sources import SOURCES, iter_documents, stdlib_files
from kimi_train.data.tokenizer import TOKENIZER_KINDS, ByteTokenizer

__all__ = ["Corpus", "PackedWindows", "TrainData", "TrainLoader", "build_data", "default_cache_dir", "load_corpus",
           "unigram_entropy", "val_batches", "SOURCES", "iter_documents", "stdlib_files", "TOKENIZER_KINDS",
           "ByteTokenizer"]
