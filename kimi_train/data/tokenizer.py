"""Tokenizers: byte-level (default), BPE trained on the corpus and cached, or a local HF tokenizer.

Every tokenizer exposes the same three things the data pipeline needs:
``vocab_size``, ``eos_id`` (the separator inserted between documents, or None) and
``encode(text) -> list[int]``. `save_pretrained` writes any of them as a directory that
``transformers.AutoTokenizer.from_pretrained`` loads with the same ids (a run keeps its
tokenizer in RUN_DIR/tokenizer/, and kimi-train-export copies it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

from kimi_train.data.errors import DataError, require

TOKENIZER_KINDS = ("byte", "bpe", "hf")
TOKENIZER_DIR = "tokenizer"  # RUN_DIR/tokenizer/: the run's tokenizer, as save_pretrained writes it


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


def tokenizer_id(tokenizer) -> str:
    """The tokenizer's content hash ("byte" for ByteTokenizer): datasets to be mixed must share it."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    tok = tokenizer._tok
    if hasattr(tok, "to_str"):  # tokenizers.Tokenizer
        text = tok.to_str()
    elif getattr(tok, "is_fast", False):
        text = tok.backend_tokenizer.to_str()
    else:
        text = json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def bpe_tokenizer(data_cfg, docs, cache_dir: Path, corpus_key: str) -> "HFTokenizer":
    """data.tokenizer=bpe: trained on ``docs`` (a bounded sample) or the cached one of the same key."""
    return train_bpe(docs, data_cfg.bpe_vocab_size, cache_dir, f"{corpus_key}-sample{data_cfg.bpe_sample_bytes}")


def train_bpe(texts: Iterable[str], vocab_size: int, cache_dir: Path, corpus_key: str) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` (or reuse the cached one for the same corpus and size)."""
    require("tokenizers", "data.tokenizer=bpe")
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
        raise DataError(f"data.tokenizer_path={path!r} does not exist (a local tokenizer.json or tokenizer dir)")
    if p.is_file():
        tokenizers = require("tokenizers", "data.tokenizer=hf with a tokenizer.json file")
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise DataError(f"data.tokenizer_path={path!r} is not a tokenizer.json file ({e})") from None
        return HFTokenizer(tok, tok.get_vocab_size(), tok.token_to_id(EOS_TOKEN), name=p.name)
    transformers = require("transformers", "data.tokenizer=hf with a tokenizer directory")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:  # no tokenizer files / an unknown tokenizer class there
        raise DataError(f"data.tokenizer_path={path!r} is not a transformers tokenizer directory "
                        f"({str(e).strip().splitlines()[0]})") from None
    return HFTokenizer(tok, len(tok), tok.eos_token_id, name=p.name)


# ------------------------------------------------------------------------------- transformers export
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what tokenizers' ByteLevel pre-tokenizer emits)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _byte_tokenizer_json() -> dict[str, Any]:
    """ByteTokenizer as a tokenizers tokenizer.json: byte b -> the character of b -> id b, no merges."""
    vocab = {char: b for b, char in _byte_chars().items()}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }  # fmt: skip


def save_pretrained(tokenizer, out_dir: str | Path, model_max_length: int) -> Path:
    """Write ``tokenizer`` as a directory that transformers.AutoTokenizer loads with our ids.

    byte: a byte-level BPE without merges (id = byte value); its eos is byte 0's character,
    declared with split_special_tokens so that text is never matched against it (a NUL in the
    text is byte 0 either way). bpe / a tokenizer.json: the tokenizers file as it is. A
    transformers tokenizer: its own save_pretrained.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                              "clean_up_tokenization_spaces": False}
    if isinstance(tokenizer, ByteTokenizer):
        (out / "tokenizer.json").write_text(json.dumps(_byte_tokenizer_json(), ensure_ascii=False))
        config.update(eos_token=_byte_chars()[ByteTokenizer.eos_id], split_special_tokens=True)
    elif hasattr(tokenizer._tok, "get_vocab_size"):  # a tokenizers.Tokenizer
        tokenizer._tok.save(str(out / "tokenizer.json"))
        if tokenizer.eos_id is not None:
            config["eos_token"] = tokenizer._tok.id_to_token(tokenizer.eos_id)
    else:  # a transformers tokenizer
        tokenizer._tok.save_pretrained(str(out))
        return out
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def saved_eos_id(tokenizer_dir: str | Path) -> Optional[int]:
    """The eos id of a save_pretrained directory (from its JSON files: no tokenizer library needed)."""
    d = Path(tokenizer_dir)
    try:
        eos = json.loads((d / "tokenizer_config.json").read_text()).get("eos_token")
        tok = json.loads((d / "tokenizer.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None:
        return None
    for added in tok.get("added_tokens") or []:
        if added.get("content") == eos:
            return int(added["id"])
    vocab = (tok.get("model") or {}).get("vocab")
    return vocab.get(eos) if isinstance(vocab, dict) else None


_MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.bin", "*.index.json", "*.pt")


def copy_saved(tokenizer_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Copy the tokenizer files of a save_pretrained (or Hugging Face model) directory into out_dir:
    every file but the model's own (config, weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in sorted(Path(tokenizer_dir).iterdir())
             if f.is_file() and not any(f.match(pattern) for pattern in _MODEL_FILES)]
    return [Path(shutil.copyfile(f, out / f.name)) for f in files]
