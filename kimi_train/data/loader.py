"""Token datasets -> packed windows -> a stateful, sharded, shuffled (and mixed) batch loader.

Legend: L = seq_len, G global batch (windows per optimizer step, all ranks), M micro-batch
size, A gradient-accumulation steps, S sources of a mixture, N_s windows of source s.

Packing: each dataset is a token stream (every document followed by its end-of-document
token), split at a document boundary into train and held-out tokens (`TokenDataset.split`);
each part is cut into windows of L + 1 tokens with stride L (inputs = w[:-1], labels = w[1:]),
so every token is a target exactly once per epoch. Windows are arithmetic: nothing is stored.

Order: the whole loader state is ``consumed``, the samples drawn so far from each source.
The next G samples go to sources by an earliest-deadline rule (order.interleave); the k-th sample
of source s is its window ``permute(k mod N_s, N_s, seed, s, k div N_s)`` (one shuffle per
epoch of that source). So the global order is a pure function of the datasets, train.seed,
seq_len and the counts; data-parallel rank r takes its contiguous slice of M*A of the G
samples at read time, and a checkpoint's ``consumed`` resumes the same order at any dp size
with the same G.

Validation: data.val_sequences windows spread evenly over the held-out documents (shared among
the sources of a mixture by weight), rank r evaluating every dp-th one: the same windows for every
dp size and micro-batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from kimi_train.data.errors import DataError
from kimi_train.data.order import interleave, permute
from kimi_train.data.sources import describe_source
from kimi_train.data.tokenizer import ByteTokenizer, bpe_tokenizer, load_hf_tokenizer


def default_cache_dir() -> Path:
    return Path(os.environ.get("KIMI_TRAIN_CACHE", Path.home() / ".cache" / "kimi_train"))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the empirical token distribution: H = -sum_v p_v ln p_v."""
    from kimi_train.data.manifest import entropy_of_counts

    return entropy_of_counts(np.bincount(tokens.astype(np.int64), minlength=vocab_size))


class PackedWindows:
    """Non-overlapping windows of L + 1 tokens (stride L) over tokens [start, end) of an array or TokenDataset."""

    def __init__(self, tokens, seq_len: int, start: int = 0, end: Optional[int] = None):
        self.tokens, self.seq_len, self.start = tokens, seq_len, start
        if end is None:
            end = len(tokens) if isinstance(tokens, np.ndarray) else tokens.num_tokens
        self.num_windows = max((end - start - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.num_windows

    def _read(self, start: int, length: int) -> np.ndarray:
        if isinstance(self.tokens, np.ndarray):
            return self.tokens[start: start + length]
        return self.tokens.read(start, length)

    def gather(self, idx):
        """Windows ``idx`` as a LongTensor [len(idx), L + 1]."""
        import torch

        rows = np.empty((len(idx), self.seq_len + 1), dtype=np.int64)
        for row, w in zip(rows, np.asarray(idx, dtype=np.int64)):
            row[:] = self._read(self.start + int(w) * self.seq_len, self.seq_len + 1)
        return torch.from_numpy(rows)


_WHAT = {"seed": "train.seed",
         "global_batch": "windows per step: train.global_batch_size, or micro_batch_size x data-parallel ranks",
         "num_windows": "training windows per source: data.*, train.seq_len",
         "fingerprints": "the datasets' manifests: data.paths / data.mix"}


class TrainLoader:
    """Shuffled, dp-sharded global batches over one or more sources; ``next_batch()`` returns this rank's
    A micro-batches. ``weights``: the sources' shares of the samples (a mixture; tokens = samples x L)."""

    def __init__(self, windows: PackedWindows | Sequence[PackedWindows], micro_batch_size: int, grad_accum: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, weights: Optional[Sequence[float]] = None,
                 names: Optional[Sequence[str]] = None, fingerprints: Optional[Sequence[str]] = None):
        self.sources = [windows] if isinstance(windows, PackedWindows) else list(windows)
        self.weights = np.asarray(weights if weights is not None else [1.0] * len(self.sources), dtype=np.float64)
        self.names = list(names or [f"source{i}" for i in range(len(self.sources))])
        self.fingerprints = list(fingerprints or [""] * len(self.sources))
        self.seed = seed
        self.micro, self.accum, self.dp_rank, self.dp_size = micro_batch_size, grad_accum, dp_rank, dp_size
        self.global_batch = micro_batch_size * grad_accum * dp_size
        total = sum(len(w) for w in self.sources)
        for name, w in zip(self.names, self.sources):
            if len(w) == 0:
                raise DataError(f"{name}: the training split has no window of seq_len+1 tokens; use more data "
                                "or a smaller train.seq_len")
        if total < self.global_batch:
            raise DataError(
                f"the training split has {total} windows of seq_len+1 tokens, fewer than one global batch "
                f"({self.global_batch}); use more data (more files, a larger data.max_bytes) or a smaller "
                "train.global_batch_size or train.seq_len"
            )
        self.consumed = np.zeros(len(self.sources), dtype=np.int64)

    @property
    def epoch(self) -> int:
        """Completed passes over the first source (the only one without a mixture)."""
        return int(self.consumed[0] // len(self.sources[0]))

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sources[0]) // self.global_batch

    def _draw(self, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample number in that source) of the next k samples after ``counts`` (updated)."""
        before = counts.copy()
        src = interleave(counts, self.weights, k)
        number = np.empty(k, dtype=np.int64)
        for s in np.unique(src):
            mine = src == s
            number[mine] = before[s] + np.arange(int(mine.sum()))
        return src, number

    def next_batch(self) -> list:
        src, number = self._draw(self.consumed, self.global_batch)
        per_rank = self.micro * self.accum
        mine = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        rows = []
        for s, k in zip(src[mine], number[mine]):
            n = len(self.sources[s])
            window = permute(np.array([k % n]), n, self.seed, int(s), int(k // n))
            rows.append(self.sources[s].gather(window))
        import torch

        return list(torch.cat(rows).split(self.micro))

    def realized_tokens(self) -> dict[str, int]:
        """Tokens drawn so far from each source (samples x seq_len), by source name."""
        return {name: int(c) * self.sources[i].seq_len for i, (name, c) in enumerate(zip(self.names, self.consumed))}

    def planned_epochs(self, steps: int) -> np.ndarray:
        """Passes over each source after ``steps`` optimizer steps (within one sample, by the interleave's bound)."""
        share = self.weights / self.weights.sum()
        return (share * steps * self.global_batch + 1) / np.array([len(w) for w in self.sources])

    def state_dict(self) -> dict:
        return {"consumed": self.consumed.tolist(), "seed": self.seed, "global_batch": self.global_batch,
                "num_windows": [len(w) for w in self.sources], "fingerprints": self.fingerprints}

    def load_state_dict(self, state: dict) -> None:
        if "consumed" not in state:
            raise DataError("the checkpoint's data loader is from before prepared datasets (the data order and "
                            "the end-of-document convention changed); start over with resume=never")
        mine = self.state_dict()
        for key in ("seed", "global_batch", "num_windows", "fingerprints"):
            if state[key] != mine[key]:
                raise DataError(
                    f"the checkpoint's data loader has {key}={state[key]} but this run has {mine[key]} ({_WHAT[key]}); "
                    "resume with the same data, seq_len, batch sizes and seed, or start over with resume=never"
                )
        self.consumed = np.asarray(state["consumed"], dtype=np.int64)


def validation_windows(sources: Sequence[PackedWindows], weights: Sequence[float], num: int) -> list[tuple[int, int]]:
    """The validation set as (source, window) pairs: ``num`` windows shared by weight, each source's spread
    evenly over its held-out documents (the first ones alone would be one or two documents)."""
    counts = np.zeros(len(sources), dtype=np.int64)
    interleave(counts, np.asarray(weights, dtype=np.float64), num)
    pairs = []
    for s, src in enumerate(sources):
        k = min(int(counts[s]), len(src))
        pairs += [(s, int(w)) for w in (np.arange(k) * len(src)) // max(k, 1)]
    return pairs


def val_batches(sources: Sequence[PackedWindows], weights: Sequence[float], num: int, micro_batch_size: int,
                dp_rank: int = 0, dp_size: int = 1) -> list:
    """This rank's validation micro-batches: every dp-th window of `validation_windows`, M at a time."""
    import torch

    mine = validation_windows(sources, weights, num)[dp_rank::dp_size]
    if not mine:
        return []
    rows = torch.cat([sources[s].gather([w]) for s, w in mine])
    return list(rows.split(micro_batch_size))


# ------------------------------------------------------------------------------------------ building
def _cache_dir(data_cfg, default: Path | None = None) -> Path:
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


def build_tokenizer(data_cfg, cache_dir: Path | None = None):
    """The configured tokenizer: byte, bpe (trained on the first data.bpe_sample_bytes, cached), or hf."""
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "bpe":
        from kimi_train.data.prepare import bpe_sample

        return bpe_tokenizer(data_cfg, bpe_sample(data_cfg), _cache_dir(data_cfg, cache_dir), describe_source(data_cfg))
    return load_hf_tokenizer(data_cfg.tokenizer_path)


def prepared_cache(data_cfg, cache_dir: Path | None = None, progress: bool = False) -> Path:
    """data=stdlib/files/hub: the source prepared once into the cache (reused while the source is unchanged)."""
    d = data_cfg
    tok_key = [d.tokenizer, d.bpe_vocab_size, d.bpe_sample_bytes] if d.tokenizer == "bpe" else [d.tokenizer]
    if d.tokenizer == "hf":
        p = Path(d.tokenizer_path).expanduser()
        tok_key += [str(p.resolve()), *(f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in
                                        ([p] if p.is_file() else sorted(p.iterdir())) if f.is_file())] if p.exists() else []
    key = hashlib.sha256(json.dumps([describe_source(d), tok_key]).encode()).hexdigest()[:16]
    out = _cache_dir(d, cache_dir) / "prepared" / f"{d.source}-{key}"
    from kimi_train.data.prepare import MANIFEST, prepare

    if not (out / MANIFEST).exists():
        prepare(d, out, build_tokenizer(d, cache_dir), workers=0, force=True, progress=progress)
    return out


@dataclass
class Corpus:
    """A small corpus in memory (tools and tests); training reads `TrainData` instead."""

    train_tokens: np.ndarray  # [N_train] integer token ids
    val_tokens: np.ndarray  # [N_val]
    tokenizer: Any
    num_documents: int
    unigram_entropy: float  # nats per token (the loss of the best unigram model)


def load_corpus(data_cfg, cache_dir: Path | None = None) -> Corpus:
    """The configured source, prepared (cached) and read whole into memory (writable copies), split at a
    document boundary."""
    from kimi_train.data.dataset import open_dataset

    ds = open_dataset([str(prepared_cache(data_cfg, cache_dir))], data_cfg)
    split = ds.split(data_cfg.val_fraction)
    tokens = ds.read(0, ds.num_tokens) if ds.num_tokens else np.zeros(0, np.uint16)
    return Corpus(np.array(tokens[:split]), np.array(tokens[split:]), ds.tokenizer, ds.num_documents,
                  ds.unigram_entropy)


@dataclass
class TrainData:
    """What the Trainer trains and validates on (`build_data`)."""

    tokenizer: Any
    loader: TrainLoader
    val_set: list  # this rank's validation micro-batches, as many on every data rank (fillers included)
    num_val: int  # validation windows over all ranks (0: no validation)
    num_documents: Optional[int]
    train_tokens: int
    val_tokens: int
    unigram_entropy: float
    description: str
    val_rows: list = field(default_factory=list)  # real rows of each val_set batch; 0: a filler

    def header(self) -> str:
        docs = "?" if self.num_documents is None else f"{self.num_documents}"
        return (f"data: {self.description}, {docs} documents, {self.train_tokens:,} train / {self.val_tokens:,} "
                f"val tokens, tokenizer {self.tokenizer.name} (vocab {self.tokenizer.vocab_size}), "
                f"unigram entropy {self.unigram_entropy:.3f} nats/token")


def build_data(cfg, dp_rank: int, dp_size: int, grad_accum: int, is_main: bool = True,
               once: Callable[[Callable[[], Any]], Any] = lambda fn: fn()) -> TrainData:
    """The training data of ``cfg``: its datasets opened (shortcut sources prepared into the cache first,
    through ``once``: the trainer passes kimi_train.parallel.once_per_node, so the first rank of the job,
    then of each node, prepares while the others wait), checked against the model's vocabulary, the
    loader and this rank's validation batches."""
    from kimi_train.data.dataset import open_dataset

    d, t = cfg.data, cfg.train
    if d.mix:
        entries = [([m.path], m.weight, m.max_epochs) for m in d.mix]
    elif d.source == "prepared":
        entries = [(list(d.paths), 1.0, None)]
    else:
        progress = is_main and cfg.logging.progress_bar
        entries = [([str(once(lambda: prepared_cache(d, progress=progress)))], 1.0, None)]
    sets = [open_dataset(paths, d) for paths, _, _ in entries]
    for s in sets[1:]:
        if s.tokenizer_sha != sets[0].tokenizer_sha:
            raise DataError(f"data.mix: {s.name!r} and {sets[0].name!r} have different tokenizers "
                            f"({s.tokenizer.name} vs {sets[0].tokenizer.name}); mix datasets prepared with one")
    tokenizer = sets[0].tokenizer
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                        f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}")
    splits = [s.split(d.val_fraction) for s in sets]
    train = [PackedWindows(s, t.seq_len, 0, cut) for s, cut in zip(sets, splits)]
    held = [PackedWindows(s, t.seq_len, cut, s.num_tokens) for s, cut in zip(sets, splits)]
    weights = [w for _, w, _ in entries]
    loader = TrainLoader(train, t.micro_batch_size, grad_accum, dp_rank, dp_size, t.seed, weights,
                         [s.name for s in sets], [s.fingerprint for s in sets])
    for i, ((_, _, cap), s, epochs) in enumerate(zip(entries, sets, loader.planned_epochs(t.steps))):
        if cap is not None and epochs > cap:
            raise DataError(f"data.mix[{i}].max_epochs={cap} but {s.name!r} would be read {epochs:.2f} times "
                            f"over train.steps={t.steps}; add data, lower its weight or raise max_epochs")
        if epochs > 1 and is_main and len(sets) > 1:
            print(f"data: {s.name} repeats, {epochs:.2f} epochs over train.steps={t.steps}", file=sys.stderr)
    num_val = d.val_sequences if t.val_batches else 0  # train.val_batches=0: no validation
    val_set = val_batches(held, weights, num_val, t.micro_batch_size, dp_rank, dp_size)
    num_val = len(validation_windows(held, weights, num_val))
    # Every data rank runs as many validation forwards (their collectives must pair up: FSDP's
    # all-gathers, EP's all-to-alls, a pipeline's rounds): a rank with fewer windows adds fillers,
    # which the mean leaves out.
    most = -(-(-(-num_val // dp_size)) // t.micro_batch_size)
    val_rows = [len(b) for b in val_set] + [0] * (most - len(val_set))
    if len(val_set) < most:
        val_set += [val_set[-1] if val_set else held[0].gather([0])] * (most - len(val_set))
    docs = None if any(s.num_documents is None for s in sets) else sum(s.num_documents for s in sets)
    described = d.source if not (d.mix or d.source == "prepared") else ", ".join(s.name for s in sets)
    entropy = float(np.average([s.unigram_entropy for s in sets], weights=weights))
    return TrainData(tokenizer, loader, val_set, num_val, docs, sum(splits),
                     sum(s.num_tokens for s in sets) - sum(splits), entropy, described, val_rows)
