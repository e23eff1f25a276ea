"""Tokenizers: byte-level (default), BPE trained on the corpus and cached, or a local HF tokenizer.

Every tokenizer exposes the same three things the data pipeline needs:
``vocab_size``, ``eos_id`` (the separator inserted between documents, or None) and
``encode(text) -> list[int]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

TOKENIZER_KINDS = ("byte", "bpe", "hf")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Byte 0 (NUL, absent from text) separates documents."""

    vocab_size = 256
    eos_id = 0
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (ours, trained BPE) or a transformers tokenizer from a local path."""

    def __init__(self, tok, vocab_size: int, eos_id: Optional[int], name: str):
        self._tok, self.vocab_size, self.eos_id, self.name = tok, vocab_size, eos_id, name

    def encode(self, text: str) -> list[int]:
        if hasattr(self._tok, "encode") and hasattr(self._tok, "get_vocab_size"):
            return self._tok.encode(text).ids  # tokenizers.Tokenizer
        return self._tok(text, add_special_tokens=False)["input_ids"]  # transformers tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if hasattr(self._tok, "encode_batch"):
            return [e.ids for e in self._tok.encode_batch(texts)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: list[str], vocab_size: int, cache_dir: Path, corpus_key: str) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` (or reuse the cached one for the same corpus and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(json.dumps([corpus_key, vocab_size]).encode()).hexdigest()[:16]
    path = cache_dir / f"bpe-{vocab_size}-{key}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.rename(path)  # atomic: a concurrent rank never reads a half-written file
    return HFTokenizer(tok, tok.get_vocab_size(), tok.token_to_id(EOS_TOKEN), name=f"bpe{vocab_size}")


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """A tokenizer saved on local disk: a tokenizer.json file or a transformers tokenizer directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.tokenizer_path={path!r} does not exist (a local tokenizer.json or tokenizer dir)")
    if p.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(p))
        return HFTokenizer(tok, tok.get_vocab_size(), tok.token_to_id(EOS_TOKEN), name=p.name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return HFTokenizer(tok, len(tok), tok.eos_token_id, name=p.name)
