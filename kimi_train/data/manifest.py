"""The prepared dataset's manifest: its names, its seal (a hash of its own content, which makes it the
dataset's content key) and its reading. A leaf: kimi-train-prepare writes it (prepare.py), every
training start reads it (dataset.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kimi_train.data.errors import DataError

MANIFEST, TOKENIZER = "manifest.json", "tokenizer"
FORMAT = "kimi-train-prepared-v1"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with "manifest_sha256": the hash of everything else in it (its content key)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return {**body, "manifest_sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def entropy_of_counts(counts: np.ndarray) -> float:
    """Entropy in nats of a token histogram: H = -sum_v p_v ln p_v (the loss of the best unigram model)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / max(counts.sum(), 1.0)
    return float(-(p * np.log(p)).sum())


def read_manifest(path: Path) -> dict:
    """A prepared dataset's manifest, its seal checked (a changed manifest is refused)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{str(path)!r}: unreadable {MANIFEST} ({e}); prepare it again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{str(path / MANIFEST)!r} is not a kimi-train prepared dataset "
                        f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
    if seal(manifest)["manifest_sha256"] != manifest.get("manifest_sha256"):
        raise DataError(f"{str(path / MANIFEST)!r} was changed after prepare (its manifest_sha256 does not "
                        "match); prepare the dataset again")
    return manifest
