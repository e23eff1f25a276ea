"""Corpus -> token stream -> packed windows -> a stateful, sharded, shuffled batch loader.

Legend: N tokens in a split, L = seq_len, W windows, G global batch (windows per
optimizer step, all ranks), M micro-batch size, A gradient-accumulation steps.

Packing: the token stream (documents joined by the tokenizer's eos) is cut into
non-overlapping windows of L + 1 tokens with stride L (inputs = w[:-1], labels = w[1:]),
so every token is a target exactly once per epoch. The last ``val_fraction`` of the
stream is held out for validation.

Order: epoch e visits the train windows in the permutation ``default_rng([seed, e])``.
Step k of an epoch takes permutation[k*G : (k+1)*G]; data-parallel rank r takes its
contiguous slice of M*A windows and cuts it into A micro-batches. The whole loader state
is (epoch, position): identical on every rank, saved with each checkpoint, so a resumed
run continues with exactly the next batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimi_train.data.errors import DataError
from kimi_train.data.sources import describe_source, iter_documents
from kimi_train.data.tokenizer import ByteTokenizer, load_hf_tokenizer, train_bpe


def default_cache_dir() -> Path:
    return Path(os.environ.get("KIMI_TRAIN_CACHE", Path.home() / ".cache" / "kimi_train"))


@dataclass
class Corpus:
    train_tokens: np.ndarray  # [N_train] integer token ids
    val_tokens: np.ndarray  # [N_val]
    tokenizer: Any
    num_documents: int
    unigram_entropy: float  # nats per token of the training split (the loss of the best unigram model)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the empirical token distribution: H = -sum_v p_v ln p_v."""
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _token_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32


def _tokenize(docs: list[str], tokenizer) -> np.ndarray:
    dtype = _token_dtype(tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):  # fast path: one big buffer
        return np.frombuffer("\0".join(docs).encode("utf-8"), dtype=np.uint8).copy()
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    out: list[int] = []
    for i, ids in enumerate(tokenizer.encode_batch(docs)):
        if i:
            out.extend(eos)
        out.extend(ids)
    return np.asarray(out, dtype=dtype)


def _cache_dir(data_cfg, default: Path | None) -> Path:
    """data.cache_dir (else ``default``, else $KIMI_TRAIN_CACHE or ~/.cache/kimi_train), created."""
    path = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else (default or default_cache_dir())
    try:
        path.mkdir(parents=True, exist_ok=True)
        problem = None if os.access(path, os.W_OK | os.X_OK) else "not writable"
    except OSError as e:
        problem = f"cannot be created: {e.strerror}"
    if problem:
        raise DataError(f"data.cache_dir={str(path)!r} {problem}; set data.cache_dir or $KIMI_TRAIN_CACHE "
                        "to a writable directory")
    return path


def build_tokenizer(data_cfg, docs: list[str], cache_dir: Path | None = None):
    """The configured tokenizer: byte, bpe (trained on ``docs``, or the cached one), or hf."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "bpe":
        return train_bpe(docs, data_cfg.bpe_vocab_size, _cache_dir(data_cfg, cache_dir), describe_source(data_cfg))
    return load_hf_tokenizer(data_cfg.tokenizer_path)


def load_corpus(data_cfg, cache_dir: Path | None = None) -> Corpus:
    """Read, tokenize (with a cache for non-byte tokenizers) and split the configured corpus."""
    key_src = describe_source(data_cfg)
    docs = list(iter_documents(data_cfg))
    if not docs:
        where = f"data.paths={list(data_cfg.paths)}" if data_cfg.source == "files" else f"data.source={data_cfg.source!r}"
        raise DataError(f"{where} produced no text (every document is empty)")
    tokenizer = build_tokenizer(data_cfg, docs, cache_dir)

    if isinstance(tokenizer, ByteTokenizer):
        tokens = _tokenize(docs, tokenizer)
    else:
        key = hashlib.sha256(json.dumps([key_src, tokenizer.name, tokenizer.vocab_size]).encode()).hexdigest()[:16]
        path = _cache_dir(data_cfg, cache_dir) / f"tokens-{key}.npy"
        if path.exists():
            tokens = np.load(path, allow_pickle=False)
        else:
            tokens = _tokenize(docs, tokenizer)
            tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npy")
            np.save(tmp, tokens, allow_pickle=False)
            os.replace(tmp, path)

    n_val = int(round(len(tokens) * data_cfg.val_fraction))
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    return Corpus(train, val, tokenizer, len(docs), unigram_entropy(train, tokenizer.vocab_size))


class PackedWindows:
    """Non-overlapping windows of L + 1 tokens (stride L) over a token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = max((len(tokens) - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.num_windows

    def gather(self, idx: np.ndarray) -> torch.Tensor:
        """Windows ``idx`` as a LongTensor [len(idx), L + 1]."""
        starts = np.asarray(idx, dtype=np.int64)[:, None] * self.seq_len
        rows = self.tokens[starts + np.arange(self.seq_len + 1)[None, :]]
        return torch.from_numpy(rows.astype(np.int64))


_WHAT = {"seed": "train.seed",
         "global_batch": "windows per step: train.global_batch_size, or micro_batch_size x data-parallel ranks",
         "num_windows": "training windows: data.*, train.seq_len"}


class TrainLoader:
    """Shuffled, dp-sharded global batches; ``next_batch()`` returns this rank's A micro-batches."""

    def __init__(self, windows: PackedWindows, micro_batch_size: int, grad_accum: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        self.windows, self.seed = windows, seed
        self.micro, self.accum, self.dp_rank, self.dp_size = micro_batch_size, grad_accum, dp_rank, dp_size
        self.global_batch = micro_batch_size * grad_accum * dp_size
        if len(windows) < self.global_batch:
            raise DataError(
                f"the training split has {len(windows)} windows of seq_len+1 tokens, fewer than one global batch "
                f"({self.global_batch}); use more data (more files, a larger data.max_bytes) or a smaller "
                "train.global_batch_size or train.seq_len"
            )
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.windows) // self.global_batch

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.windows))
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> list[torch.Tensor]:
        if self.position + self.global_batch > len(self.windows):  # drop the ragged tail of an epoch
            self.epoch, self.position = self.epoch + 1, 0
        idx = self._permutation()[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.micro * self.accum
        mine = idx[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        batch = self.windows.gather(mine)
        return list(batch.split(self.micro))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "global_batch": self.global_batch, "num_windows": len(self.windows)}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "global_batch", "num_windows"):
            if state[key] != mine[key]:
                raise DataError(
                    f"the checkpoint's data loader has {key}={state[key]} but this run has {mine[key]} ({_WHAT[key]}); "
                    "resume with the same data, seq_len, batch sizes and seed, or start over with resume=never"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def val_batches(windows: PackedWindows, num_batches: int, micro_batch_size: int,
                dp_rank: int = 0, dp_size: int = 1) -> list[torch.Tensor]:
    """The fixed validation set: the first num_batches * M * dp windows, rank r taking every dp-th batch."""
    total = min(num_batches * micro_batch_size * dp_size, len(windows))
    usable = (total // (micro_batch_size * dp_size)) * micro_batch_size * dp_size
    if usable == 0:
        return []
    idx = np.arange(usable).reshape(-1, dp_size, micro_batch_size)[:, dp_rank].reshape(-1)
    return list(windows.gather(idx).split(micro_batch_size))
