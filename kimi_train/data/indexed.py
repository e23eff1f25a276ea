"""Token files on disk, memory-mapped: Megatron-LM's indexed format, and raw token arrays.

Megatron indexed dataset (megatron-core ``datasets/indexed_dataset.py``), a path prefix P:
P.bin holds the tokens back to back; P.idx is

    b"MMIDIDX\\x00\\x00"  <Q version 1  <B dtype code  <Q sequences S  <Q document indices D
    int32 lengths [S]   int64 byte pointers [S]   int64 document indices [D]   (int8 modes [S])

The document indices start at 0 and hold the sequence count at each document's end. A
prepared dataset writes one sequence per document, end-of-document token included
(preprocess_data.py --append-eod). Reading never loads an O(corpus) array: `TokenFile`
memory-maps both files, and document starts come from the pointers on demand.

Raw token files (nanoGPT's train.bin, OLMo's token .npy) have no index: their dtype and
end-of-document id come from the config, and document boundaries are found by looking for
the end-of-document id before the one place that needs them (the start of the held-out split).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Optional

import numpy as np

from kimi_train.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
_CODE_OF = {np.dtype(t): c for c, t in _CODES.items()}
RAW_DTYPES = ("uint8", "uint16", "int32", "uint32", "int64")
_HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def _with(prefix: Path, ext: str) -> Path:
    """P + ext (a prefix may contain dots of its own: never Path.with_suffix)."""
    return Path(str(prefix) + ext)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, int32 otherwise (Megatron's rule; uint8 is not used for tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


class IndexWriter:
    """Write P.bin / P.idx one document at a time; ``finish()`` writes the index (atomically: .idx last)."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        self._bin = open(_with(self.prefix, ".bin"), "wb")
        self.lengths: list[int] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given back to back in ``tokens``, ``lengths`` tokens each."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.lengths.extend(int(n) for n in lengths)

    def finish(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        docs = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
        tmp = _with(self.prefix, ".idx.tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", 1) + struct.pack("<B", _CODE_OF[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(docs)))
            f.write(lengths.tobytes() + pointers.tobytes() + docs.tobytes())
        tmp.replace(_with(self.prefix, ".idx"))


class TokenFile:
    """One memory-mapped token file: ``tokens`` (a 1-D memmap) and ``doc_start(i)`` / ``num_docs``.

    ``eod_id``: raw files only (indexed files know their documents).
    """

    def __init__(self, tokens: np.ndarray, pointers: Optional[np.ndarray], eod_id: Optional[int], where: str):
        self.tokens, self._pointers, self.eod_id, self.where = tokens, pointers, eod_id, where

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_start_at_or_before(self, offset: int) -> int:
        """The last document start <= offset: where a held-out split may begin (0: none before)."""
        if self._pointers is not None:
            i = int(np.searchsorted(self._pointers, offset * self.tokens.dtype.itemsize, side="right")) - 1
            return int(self._pointers[max(i, 0)]) // self.tokens.dtype.itemsize if len(self._pointers) else 0
        if self.eod_id is None:  # no boundaries known: split anywhere
            return offset
        step = 1 << 16
        for hi in range(offset, 0, -step):  # the token after the last eod before offset
            lo = max(hi - step, 0)
            hits = np.flatnonzero(self.tokens[lo:hi] == self.eod_id)
            if len(hits):
                return lo + int(hits[-1]) + 1
        return 0


def read_index(prefix: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """(dtype, lengths [S] int32, pointers [S] int64) of P.idx, memory-mapped; DataError if it is not one."""
    path = _with(prefix, ".idx")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER)
    if len(head) < _HEADER or head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{str(path)!r} is not a Megatron .idx file (no MMIDIDX header)")
    version, code = struct.unpack("<Q", head[9:17])[0], head[17]
    n_seq, n_doc = struct.unpack("<QQ", head[18:34])
    if version != 1 or code not in _CODES:
        raise DataError(f"{str(path)!r}: unsupported .idx version {version} or dtype code {code}")
    need = _HEADER + n_seq * 4 + n_seq * 8 + n_doc * 8
    if size < need:
        raise DataError(f"{str(path)!r} is truncated ({size} bytes, its header needs {need})")
    idx = np.memmap(path, dtype=np.uint8, mode="r")
    lengths = idx[_HEADER: _HEADER + 4 * n_seq].view(np.int32)
    pointers = idx[_HEADER + 4 * n_seq: _HEADER + 12 * n_seq].view(np.int64)
    return np.dtype(_CODES[code]), lengths, pointers


def open_indexed(prefix: str | Path) -> TokenFile:
    """P.bin through P.idx's dtype; the .bin must hold exactly the tokens the index points to."""
    prefix = Path(prefix)
    dtype, lengths, pointers = read_index(prefix)
    bin_path = _with(prefix, ".bin")
    if not bin_path.exists():
        raise DataError(f"{str(bin_path)!r} does not exist (the .idx has no .bin beside it)")
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if len(lengths) else 0
    size = bin_path.stat().st_size
    if size != end:
        raise DataError(f"{str(bin_path)!r} has {size} bytes but its .idx points to {end}: "
                        "truncated or not the index's data; prepare it again")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return TokenFile(tokens, pointers, None, str(prefix))


def open_raw(path: str | Path, dtype: Optional[str], eod_id: Optional[int]) -> TokenFile:
    """A raw token array: a .bin (nanoGPT) or a .npy (OLMo's raw arrays, or with a NumPy header)."""
    path = Path(path)
    with open(path, "rb") as f:
        has_header = f.read(6) == b"\x93NUMPY"
    if has_header:
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise DataError(f"{str(path)!r} holds a {tokens.dtype} array of shape {tokens.shape}, "
                            "not a 1-D array of token ids")
    else:
        if dtype is None:
            raise DataError(f"{str(path)!r} is a raw token file; give its dtype, e.g. data.dtype=uint16 "
                            f"(valid: {', '.join(RAW_DTYPES)})")
        itemsize = np.dtype(dtype).itemsize
        if path.stat().st_size % itemsize:
            raise DataError(f"{str(path)!r} has {path.stat().st_size} bytes, not a whole number of "
                            f"data.dtype={dtype} tokens")
        tokens = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    return TokenFile(tokens, None, eod_id, str(path))
