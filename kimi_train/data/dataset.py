"""A token dataset to train on: prepared directories, Megatron prefixes or raw token files, memory-mapped.

`open_dataset(paths, data_cfg)` checks what a start can check without reading the tokens
(the manifest's seal, every file's size, each .idx against its .bin) and returns a
`TokenDataset`: the parts in order, their tokenizer, a fingerprint (what a checkpoint
records), and the train / held-out split at a document boundary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kimi_train.data.errors import DataError
from kimi_train.data.indexed import TokenFile, open_indexed, open_raw
from kimi_train.data.manifest import MANIFEST, TOKENIZER, entropy_of_counts, read_manifest
from kimi_train.data.tokenizer import ByteTokenizer, HFTokenizer, load_hf_tokenizer, tokenizer_id

ENTROPY_SAMPLE = 1 << 24  # tokens read to estimate a foreign dataset's unigram entropy


@dataclass
class TokenDataset:
    name: str  # what messages and metrics call it (a path)
    parts: list[TokenFile]
    tokenizer: Any
    tokenizer_sha: str
    fingerprint: str  # the manifest seal, or the files' sizes and times (foreign data)
    num_documents: Optional[int]
    unigram_entropy: float

    def __post_init__(self):
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # [parts + 1]: small (one per shard)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the parts back to back."""
        out, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            local = start - int(self.starts[k])
            piece = self.parts[k].tokens[local: local + length]
            out.append(piece)
            start, length, k = start + len(piece), length - len(piece), k + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def split(self, val_fraction: float) -> int:
        """Where the held-out documents begin: the last document start at or before (1 - val_fraction) of
        the tokens, so that at least that share is held out (the end when val_fraction is 0; one document
        or none: the whole dataset trains). Train is [0, split), validation [split, end)."""
        at = int(round(self.num_tokens * (1 - val_fraction)))
        if val_fraction <= 0 or at >= self.num_tokens:
            return self.num_tokens
        k = int(np.searchsorted(self.starts, at, side="right")) - 1
        cut = int(self.starts[k]) + self.parts[k].doc_start_at_or_before(at - int(self.starts[k]))
        return cut if cut > 0 else self.num_tokens


def _prepared(path: Path) -> TokenDataset:
    manifest = read_manifest(path)
    parts = []
    for shard in manifest["shards"]:
        for ext in ("bin", "idx"):
            f = path / f"{shard['prefix']}.{ext}"
            size = f.stat().st_size if f.exists() else None
            if size != shard[f"{ext}_bytes"]:
                raise DataError(f"{str(f)!r} has {size} bytes but the manifest says {shard[f'{ext}_bytes']}: "
                                "damaged or changed; prepare the dataset again")
        parts.append(open_indexed(path / shard["prefix"]))
    tok = manifest["tokenizer"]
    if tok["sha256"] == "byte":
        tokenizer: Any = ByteTokenizer()
    else:
        from tokenizers import Tokenizer

        tokenizer = HFTokenizer(Tokenizer.from_file(str(path / TOKENIZER / "tokenizer.json")), tok["vocab_size"],
                                tok["eos_id"], tok["name"])
    return TokenDataset(str(path), parts, tokenizer, tok["sha256"], manifest["manifest_sha256"],
                        manifest["documents"], manifest["unigram_entropy"])


def _foreign_tokenizer(data_cfg, where: str):
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.tokenizer == "hf" and data_cfg.tokenizer_path:
        return load_hf_tokenizer(data_cfg.tokenizer_path)
    raise DataError(f"{where!r} has no tokenizer of its own; name it with data.tokenizer=hf "
                    "data.tokenizer_path=... (or data.tokenizer=byte)")


def _stamp(*files: Path) -> str:
    parts = [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _megatron_prefix(path: Path) -> Optional[Path]:
    """P for a path given as P, P.bin or P.idx when P.idx exists; else None (a raw token file)."""
    if Path(str(path) + ".idx").exists():
        return path
    if path.suffix in (".bin", ".idx") and path.with_suffix(".idx").exists():
        return path.with_suffix("")
    return None


def _foreign(path: Path, data_cfg) -> TokenDataset:
    """A Megatron prefix (P.idx + P.bin) or a raw token file (.bin without .idx, .npy)."""
    prefix = _megatron_prefix(path)
    if prefix is not None:
        part = open_indexed(prefix)
        files = (Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin"))
        docs: Optional[int] = len(part._pointers)
    else:
        part = open_raw(path, data_cfg.dtype, data_cfg.eod_id)
        files, docs = (path,), None
    tokenizer = _foreign_tokenizer(data_cfg, str(path))
    sample = np.asarray(part.tokens[:ENTROPY_SAMPLE])
    if len(sample) and int(sample.max()) >= tokenizer.vocab_size:
        raise DataError(f"{str(path)!r} holds token id {int(sample.max())}, outside the tokenizer's vocabulary "
                        f"({tokenizer.vocab_size}); name its tokenizer with data.tokenizer_path")
    counts = np.bincount(sample.astype(np.int64), minlength=tokenizer.vocab_size) if len(sample) else np.zeros(1)
    return TokenDataset(str(path), [part], tokenizer, tokenizer_id(tokenizer), _stamp(*files), docs,
                        entropy_of_counts(counts))


def open_dataset(paths: list[str], data_cfg) -> TokenDataset:
    """``paths`` (prepared directories, Megatron prefixes, raw token files) as one dataset, back to back."""
    if not paths:
        raise DataError("data.paths=[] is empty; data.source=prepared needs prepared directories or token files")
    sets = []
    for p in paths:
        path = Path(p).expanduser()
        if (path / MANIFEST).exists():
            sets.append(_prepared(path))
        elif path.is_dir():
            raise DataError(f"data.paths: {str(p)!r} is a directory without {MANIFEST}: not a prepared dataset "
                            "(run kimi-train-prepare, or give a Megatron prefix or a token file)")
        elif path.exists() or _megatron_prefix(path) is not None:
            sets.append(_foreign(path, data_cfg))
        else:
            raise DataError(f"data.paths: {str(p)!r} does not exist (a prepared directory, a Megatron prefix "
                            "P of P.bin/P.idx, or a .bin/.npy token file)")
    first = sets[0]
    for other in sets[1:]:
        if other.tokenizer_sha != first.tokenizer_sha:
            raise DataError(f"{other.name!r} and {first.name!r} have different tokenizers "
                            f"({other.tokenizer.name} vs {first.tokenizer.name}); use datasets prepared with one")
    if len(sets) == 1:
        return first
    tokens = [s.num_tokens for s in sets]
    docs = None if any(s.num_documents is None for s in sets) else sum(s.num_documents for s in sets)
    entropy = float(np.average([s.unigram_entropy for s in sets], weights=tokens))  # approximate: per-set H
    return TokenDataset(",".join(s.name for s in sets), [p for s in sets for p in s.parts], first.tokenizer,
                        first.tokenizer_sha, hashlib.sha256("|".join(s.fingerprint for s in sets).encode()).hexdigest(),
                        docs, entropy)
