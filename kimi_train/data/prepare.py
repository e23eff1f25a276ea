"""`kimi-train-prepare`: a source, tokenized by a worker pool, into a prepared dataset directory.

    OUT/tokenizer/                 the tokenizer (transformers.AutoTokenizer loads it)
    OUT/shard-00000.bin / .idx     Megatron indexed shards, uint16 or int32, one end-of-document token per doc
    OUT/manifest.json              source, tokenizer (name, hash, vocab), per-shard documents, tokens, file
                                   sizes and sha256, unigram entropy; "manifest_sha256" seals the rest

Memory does not grow with the corpus: the main process reads the source as blocks of about
1 MB (sources.iter_blocks), at most two per worker are in flight, and a shard's index holds
one int per document of that shard only. Workers start with `spawn` and import numpy and
tokenizers, never torch. A shard is closed every SHARD_BYTES of source text, at a block
boundary; progress.json records the finished shards and how many blocks they consumed, so
the same command after a stop skips those blocks and continues.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any, Optional

import numpy as np

from kimi_train.data.errors import DataError
from kimi_train.data.indexed import IndexWriter, token_dtype
from kimi_train.data.manifest import (FORMAT, MANIFEST, TOKENIZER, entropy_of_counts, read_manifest, seal,
                                      sha256_file)
from kimi_train.data.sources import block_documents, describe_source, iter_blocks, iter_documents
from kimi_train.data.tokenizer import ByteTokenizer, save_pretrained, tokenizer_id

PROGRESS = "progress.json"
SHARD_BYTES = 1 << 28  # source text per shard


# ------------------------------------------------------------------------------------------ workers
_ENCODE: Any = None


def _init_worker(tokenizer_dir: Optional[str], eos_id: Optional[int], threads: int) -> None:
    """Load the tokenizer once per worker (tokenizers' own threads: one per worker in a pool)."""
    global _ENCODE
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _ENCODE = _encoder(tokenizer_dir, eos_id)


def _encoder(tokenizer_dir: Optional[str], eos_id: Optional[int]):
    """docs -> (tokens int64, lengths): each document's ids followed by eos_id (byte: id = byte, eos 0)."""
    if tokenizer_dir is None:
        def encode_bytes(docs: list[str]):
            raw = [d.encode("utf-8") for d in docs]
            tokens = np.frombuffer(b"\0".join(raw) + b"\0", dtype=np.uint8)
            return tokens, np.fromiter((len(r) + 1 for r in raw), np.int64, len(raw))
        return encode_bytes
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    eos = [] if eos_id is None else [eos_id]

    def encode(docs: list[str]):
        ids = [np.asarray(e.ids + eos, dtype=np.int64) for e in tok.encode_batch(docs, add_special_tokens=False)]
        return (np.concatenate(ids) if ids else np.zeros(0, np.int64)), np.fromiter(map(len, ids), np.int64, len(ids))
    return encode


def _tokenize(block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, tokens per document, UTF-8 bytes per document) of one block's non-empty documents."""
    docs = [d for d in block_documents(block) if d]
    tokens, lengths = _ENCODE(docs)
    return tokens, lengths, np.fromiter((len(d.encode("utf-8")) for d in docs), np.int64, len(docs))


# ------------------------------------------------------------------------------------------ helpers
def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _identity(data_cfg, tokenizer) -> dict:
    """What makes two prepared datasets the same: the source (with its files' sizes and times) and the tokenizer."""
    return {"source": describe_source(data_cfg), "tokenizer": {
        "name": tokenizer.name, "sha256": tokenizer_id(tokenizer), "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id}}


def _source_bytes(data_cfg) -> Optional[int]:
    """The progress bar's total: the text (or file) bytes to read, when known up front."""
    if data_cfg.source == "files":
        from kimi_train.data.sources import checked_files

        total = sum(f.stat().st_size for f in checked_files(list(data_cfg.paths)))
    elif data_cfg.source == "stdlib":
        from kimi_train.data.sources import stdlib_files

        total = sum(f.stat().st_size for f in stdlib_files())
    else:
        total = None
    if data_cfg.max_bytes:
        total = min(total, data_cfg.max_bytes) if total else data_cfg.max_bytes
    return total


def _block_bytes(block) -> int:
    return len(block[1]) if block[0] == "jsonl" else sum(len(d) for d in block[1])


# ------------------------------------------------------------------------------------------ prepare
def prepare(data_cfg, out: str | Path, tokenizer, workers: int = 0, force: bool = False,
            progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Tokenize ``data_cfg``'s source into ``out`` (a finished identical dataset there: nothing to do).

    ``workers``: tokenizing processes (0: this process, with the tokenizer's own threads).
    """
    out = Path(out)
    identity = _identity(data_cfg, tokenizer)
    for name in (MANIFEST, PROGRESS):
        if (out / name).exists():
            old = json.loads((out / name).read_text())
            if {k: old.get(k) for k in identity} == identity:
                if name == MANIFEST:
                    return out
                break
            if not force:
                what = "a finished" if name == MANIFEST else "an unfinished"
                raise DataError(f"out={str(out)!r} holds {what} prepared dataset of another source or tokenizer "
                                f"({old.get('source')!r}); choose another out or pass force=true to replace it")
            shutil.rmtree(out)
            break
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((out / PROGRESS).read_text()) if (out / PROGRESS).exists() else \
        {**identity, "shards": [], "blocks": 0, "text_bytes": 0, "counts": [0] * tokenizer.vocab_size}
    tok_dir = out / TOKENIZER
    save_pretrained(tokenizer, tok_dir, model_max_length=1 << 30)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = np.asarray(state["counts"], dtype=np.int64)
    worker_args = (None if isinstance(tokenizer, ByteTokenizer) else str(tok_dir), tokenizer.eos_id)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=_source_bytes(data_cfg), initial=state["text_bytes"], unit="B", unit_scale=True,
                   unit_divisor=1024, desc="prepare", dynamic_ncols=True)
    blocks = iter_blocks(data_cfg)
    for _ in range(state["blocks"]):  # finished shards: their blocks are read, not tokenized
        next(blocks)
    results = _tokenized(blocks, worker_args, workers)
    shard: Optional[dict] = None
    writer: Optional[IndexWriter] = None
    done = False
    try:
        for block_bytes, (tokens, lengths, text_bytes) in results:
            if writer is None:
                shard = {"prefix": f"shard-{len(state['shards']):05d}", "documents": 0, "tokens": 0,
                         "text_bytes": 0, "blocks": 0}
                writer = IndexWriter(out / shard["prefix"], dtype)
            if data_cfg.max_bytes:  # stop after the document that reaches the cap
                room = data_cfg.max_bytes - state["text_bytes"] - shard["text_bytes"]
                reach = np.cumsum(text_bytes)
                if len(reach) and reach[-1] >= room:
                    keep = int(np.searchsorted(reach, room, side="left")) + 1
                    tokens, lengths, text_bytes = tokens[: lengths[:keep].sum()], lengths[:keep], text_bytes[:keep]
                    done = True
            writer.add_documents(tokens, lengths)
            counts += np.bincount(tokens, minlength=len(counts))[: len(counts)]
            shard["documents"] += len(lengths)
            shard["tokens"] += int(lengths.sum())
            shard["text_bytes"] += int(text_bytes.sum())
            shard["blocks"] += 1
            if bar is not None:
                bar.update(int(text_bytes.sum()) if block_bytes is None else block_bytes)
            if done or shard["text_bytes"] >= shard_bytes:
                _close_shard(out, writer, shard, state, counts)
                writer = None
            if done:
                break
        if writer is not None:
            _close_shard(out, writer, shard, state, counts)
    finally:
        results.close()
        if bar is not None:
            bar.close()
    if sum(s["tokens"] for s in state["shards"]) == 0:
        raise DataError(f"{identity['source']!r} produced no text (every document is empty)")
    manifest = seal({**identity, "format": FORMAT, "dtype": dtype.name, "shards": state["shards"],
                     "documents": sum(s["documents"] for s in state["shards"]),
                     "tokens": sum(s["tokens"] for s in state["shards"]),
                     "text_bytes": state["text_bytes"], "unigram_entropy": entropy_of_counts(counts)})
    _write_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink()
    return out


def _close_shard(out: Path, writer: IndexWriter, shard: dict, state: dict, counts: np.ndarray) -> None:
    writer.finish()
    for ext in ("bin", "idx"):
        path = out / f"{shard['prefix']}.{ext}"
        shard[f"{ext}_bytes"], shard[f"{ext}_sha256"] = path.stat().st_size, sha256_file(path)
    state["shards"].append(shard)
    state["blocks"] += shard["blocks"]
    state["text_bytes"] += shard["text_bytes"]
    state["counts"] = counts.tolist()
    _write_json(out / PROGRESS, state)


def _tokenized(blocks, worker_args, workers: int):
    """(source bytes of the block or None, _tokenize(block)) in order; at most 2 blocks per worker in flight."""
    if workers <= 0:
        global _ENCODE
        _ENCODE = _encoder(*worker_args)
        for block in blocks:
            yield (_block_bytes(block) if block[0] == "jsonl" else None), _tokenize(block)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(*worker_args, 1)) as pool:
        pending: deque = deque()
        for block in blocks:
            pending.append(((_block_bytes(block) if block[0] == "jsonl" else None), pool.apply_async(_tokenize, (block,))))
            if len(pending) >= 2 * workers:
                size, job = pending.popleft()
                yield size, job.get()
        while pending:
            size, job = pending.popleft()
            yield size, job.get()


# ------------------------------------------------------------------------------------------ verify
def verify(path: str | Path) -> dict:
    """Check every file of a prepared dataset against its manifest (sizes and sha256); the manifest."""

    out = Path(path)
    manifest = read_manifest(out)
    for shard in manifest["shards"]:
        for ext in ("bin", "idx"):
            f = out / f"{shard['prefix']}.{ext}"
            if not f.exists() or sha256_file(f) != shard[f"{ext}_sha256"]:
                raise DataError(f"verify: {str(f)!r} does not match its manifest (sha256); prepare it again")
    return manifest


def bpe_sample(data_cfg):
    """The documents the BPE tokenizer is trained on: the first data.bpe_sample_bytes of text."""
    cap = data_cfg.bpe_sample_bytes
    if data_cfg.max_bytes:
        cap = min(cap, data_cfg.max_bytes)
    total = 0
    for doc in iter_documents(data_cfg):
        yield doc
        total += len(doc.encode("utf-8"))
        if total >= cap:
            return
