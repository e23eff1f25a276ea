"""kimi-train-prepare: token ids, shards, manifest, restart, refusals, verify; megatron-core reads what we write."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from kimi_train.config import DataConfig
from kimi_train.data.errors import DataError
from kimi_train.data.loader import build_tokenizer
from kimi_train.data.prepare import MANIFEST, PROGRESS, prepare, verify
from kimi_train.data.tokenizer import ByteTokenizer

DOCS = [f"doc {i}: " + "naïve café " * (i % 7 + 1) + "日本語" * (i % 3) + "\n" for i in range(120)] + [""]


def write_jsonl(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def files_cfg(path: Path, tmp: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "files", "paths": [str(path)], "max_bytes": 0, "cache_dir": str(tmp / "cache"), **kw})


def shard_tokens(out: Path) -> list[np.ndarray]:
    """The documents of a prepared dataset, through megatron-core's own reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    docs = []
    for shard in json.loads((out / MANIFEST).read_text())["shards"]:
        ds = IndexedDataset(str(out / shard["prefix"]))
        assert len(ds) == shard["documents"] and list(ds.document_indices) == list(range(len(ds) + 1))
        docs += [np.array(ds[i], copy=True) for i in range(len(ds))]  # ds unmaps its files when collected
    return docs


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of ~512 bytes of source, so that shards (closed at block boundaries) are small too."""
    import kimi_train.data.sources as sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", 512)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    cfg = files_cfg(write_jsonl(tmp / "d.jsonl"), tmp, tokenizer="bpe", bpe_vocab_size=300)
    return cfg, build_tokenizer(cfg)


def test_workers_write_what_the_tokenizer_gives_and_megatron_reads_it(bpe, tmp_path):
    cfg, tok = bpe
    out = prepare(cfg, tmp_path / "w2", tok, workers=2, progress=False, shard_bytes=1500)
    docs = shard_tokens(out)
    want = [tok.encode(d) + [tok.eos_id] for d in DOCS if d]  # every document + its end-of-document token
    assert [d.tolist() for d in docs] == want
    m = json.loads((out / MANIFEST).read_text())
    assert len(m["shards"]) > 2 and m["dtype"] == "uint16" and m["documents"] == len(want)
    assert m["tokens"] == sum(map(len, want)) and m["tokenizer"]["vocab_size"] == tok.vocab_size
    assert not (out / PROGRESS).exists()
    flat = np.concatenate(docs)
    p = np.bincount(flat, minlength=tok.vocab_size) / len(flat)
    assert m["unigram_entropy"] == pytest.approx(-(p[p > 0] * np.log(p[p > 0])).sum())
    # one process, one shard: the same token stream
    single = prepare(cfg, tmp_path / "w0", tok, workers=0, progress=False)
    assert np.array_equal(np.concatenate(shard_tokens(single)), flat)
    # the tokenizer directory loads in transformers with the same ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert hf(DOCS[5], add_special_tokens=False)["input_ids"] == tok.encode(DOCS[5])
    assert verify(out)["documents"] == len(want)


def test_byte_tokens_are_utf8_plus_nul_and_max_bytes_stops_after_the_document_reaching_it(tmp_path):
    cfg = files_cfg(write_jsonl(tmp_path / "d.jsonl"), tmp_path, max_bytes=1000)
    out = prepare(cfg, tmp_path / "out", ByteTokenizer(), progress=False, shard_bytes=300)  # the cap spans shards
    docs = [bytes(d.astype(np.uint8)) for d in shard_tokens(out)]
    sizes = np.cumsum([len(d.encode()) for d in DOCS])
    n = int(np.searchsorted(sizes, 1000)) + 1
    assert sizes[n - 2] < 1000 <= sizes[n - 1]
    assert docs == [x.encode() + b"\0" for x in DOCS[:n]]


def test_a_stopped_prepare_continues_to_the_same_dataset(bpe, tmp_path, monkeypatch):
    cfg, tok = bpe
    whole = prepare(cfg, tmp_path / "whole", tok, progress=False, shard_bytes=1500)
    import kimi_train.data.prepare as prep

    real, closed = prep._close_shard, []

    def stop_after_two(*args):
        real(*args)
        closed.append(1)
        if len(closed) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_close_shard", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "cut", tok, progress=False, shard_bytes=1500)
    monkeypatch.setattr(prep, "_close_shard", real)
    assert len(json.loads((tmp_path / "cut" / PROGRESS).read_text())["shards"]) == 2
    tokenized = []
    monkeypatch.setattr(prep, "_tokenize", lambda block, f=prep._tokenize: tokenized.append(1) or f(block))
    prepare(cfg, tmp_path / "cut", tok, progress=False, shard_bytes=1500)
    a, b = (json.loads((d / MANIFEST).read_text()) for d in (whole, tmp_path / "cut"))
    assert a["shards"] == b["shards"] and a["unigram_entropy"] == b["unigram_entropy"]
    assert len(tokenized) == sum(s["blocks"] for s in a["shards"][2:])  # finished shards were not redone


def test_another_dataset_at_out_is_refused_without_force_and_verify_finds_a_changed_shard(tmp_path):
    a = files_cfg(write_jsonl(tmp_path / "a.jsonl"), tmp_path)
    b = files_cfg(write_jsonl(tmp_path / "b.jsonl", DOCS[:10]), tmp_path)
    out = prepare(a, tmp_path / "out", ByteTokenizer(), progress=False)
    assert prepare(a, out, ByteTokenizer(), progress=False) == out  # the same: nothing to do
    with pytest.raises(DataError, match=r"holds a finished prepared dataset of another source .* force=true"):
        prepare(b, out, ByteTokenizer(), progress=False)
    prepare(b, out, ByteTokenizer(), progress=False, force=True)
    assert json.loads((out / MANIFEST).read_text())["documents"] == 10
    with open(out / "shard-00000.bin", "r+b") as f:  # same size, one byte changed
        f.seek(3)
        f.write(b"\xff")
    with pytest.raises(DataError, match=r"shard-00000.bin' does not match its manifest \(sha256\)"):
        verify(out)


def test_cli_prepares_and_refuses_in_one_line(tmp_path, capsys):
    from kimi_train.tools.prepare import main

    src = write_jsonl(tmp_path / "d.jsonl")
    base = ["data=files", f"data.paths=[{src}]", f"data.cache_dir={tmp_path / 'cache'}", "progress=false", "workers=0"]
    main([*base, f"out={tmp_path / 'out'}"])
    assert "1 shards, 120 documents" in capsys.readouterr().out
    for args, line in ([[f"out={tmp_path / 'out2'}", "data.text_field=body"], "data.text_field='body' is not a column of"],
                       [[f"out={tmp_path / 'out3'}", "data.tokenizer=bpe", "data.bpe_vocab_size=10"],
                        "data.bpe_vocab_size=10 is not valid; must be >= 260"],
                       [["workers=two", f"out={tmp_path / 'out4'}"], "workers='two' is not valid"]):
        with pytest.raises(SystemExit) as exit_:
            main([*base, *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and line in err, err


def test_workers_do_not_import_torch():
    code = ("import sys, kimi_train.data.prepare as p; p._init_worker(None, 0, 1); "
            "p._tokenize(('jsonl', b'{\"text\": \"x\"}\\n', 'text\\0f')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
