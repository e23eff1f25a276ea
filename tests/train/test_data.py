import json
import math
import numpy as np
import pytest
import torch

from kimi_train.config import DataConfig
from kimi_train.data import PackedWindows, TrainLoader, load_corpus, stdlib_files, unigram_entropy, val_batches
from kimi_train.data.sources import describe_source


def _windows(n_tokens=10_000, seq_len=16):
    return PackedWindows(np.arange(n_tokens, dtype=np.int32) % 251, seq_len)


def test_packing_windows_overlap_by_one_token():
    w = PackedWindows(np.arange(100, dtype=np.int32), 10)
    assert len(w) == 9  # (100 - 1) // 10
    b = w.gather(np.array([0, 3]))
    assert b.shape == (2, 11) and b.dtype == torch.int64
    assert b[0].tolist() == list(range(0, 11)) and b[1].tolist() == list(range(30, 41))


def test_loader_is_deterministic_and_resumes_with_the_exact_next_batch():
    a = TrainLoader(_windows(), micro_batch_size=4, grad_accum=2, seed=7)
    batches = [torch.cat(a.next_batch()) for _ in range(200)]  # > 1 epoch (624 windows / 8)
    assert a.epoch >= 2
    b = TrainLoader(_windows(), micro_batch_size=4, grad_accum=2, seed=7)
    for _ in range(90):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # survives JSON
    c = TrainLoader(_windows(), micro_batch_size=4, grad_accum=2, seed=7)
    c.load_state_dict(state)
    for i in range(90, 200):
        assert torch.equal(torch.cat(c.next_batch()), batches[i])
    other_seed = TrainLoader(_windows(), micro_batch_size=4, grad_accum=2, seed=8)
    assert not torch.equal(torch.cat(other_seed.next_batch()), batches[0])


def test_epoch_visits_every_window_once():
    loader = TrainLoader(_windows(n_tokens=16 * 64 + 1), micro_batch_size=8, grad_accum=1, seed=0)
    seen = torch.cat([torch.cat(loader.next_batch()) for _ in range(loader.steps_per_epoch)])
    assert sorted(seen[:, 0].tolist()) == sorted(((np.arange(64) * 16) % 251).tolist())


def test_dp_ranks_split_the_global_batch():
    full = TrainLoader(_windows(), micro_batch_size=4, grad_accum=1, dp_size=1, seed=3)
    full.micro = 4 * 3  # one rank holding the whole global batch of 3 ranks
    full.global_batch = 12
    ranks = [TrainLoader(_windows(), micro_batch_size=4, grad_accum=1, dp_rank=r, dp_size=3, seed=3) for r in range(3)]
    for _ in range(5):
        whole = torch.cat(full.next_batch())
        parts = torch.cat([torch.cat(r.next_batch()) for r in ranks])
        assert torch.equal(whole, parts)


def test_resume_with_other_batch_size_is_refused():
    a = TrainLoader(_windows(), micro_batch_size=4, grad_accum=2, seed=7)
    b = TrainLoader(_windows(), micro_batch_size=4, grad_accum=1, seed=7)
    with pytest.raises(ValueError, match="global_batch=8 but this run has 4"):
        b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("micro", [2, 3])
def test_val_windows_are_the_same_for_every_dp_size_and_micro_batch(micro):
    w = _windows()
    one = torch.cat(val_batches([w], [1.0], 7, micro))
    assert one.shape == (7, 17) and torch.equal(one, w.gather(np.arange(7) * len(w) // 7))  # spread evenly
    two = [torch.cat(val_batches([w], [1.0], 7, micro, dp_rank=r, dp_size=2)) for r in range(2)]
    assert sorted(map(tuple, torch.cat(two).tolist())) == sorted(map(tuple, one.tolist()))


def test_unigram_entropy_in_nats():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 5, dtype=np.uint8), 256) == pytest.approx(math.log(4))
    assert unigram_entropy(np.zeros(10, dtype=np.uint8), 256) == 0.0


def test_stdlib_corpus_bytes_split_and_cap():
    files = stdlib_files()
    assert len(files) > 100 and not any("site-packages" in str(f) for f in files)
    cfg = DataConfig(max_bytes=100_000, val_fraction=0.1)
    c = load_corpus(cfg)
    total = len(c.train_tokens) + len(c.val_tokens)  # the text bytes + one end-of-document byte per document
    assert 100_000 + c.num_documents <= total < 100_000 + max(f.stat().st_size for f in files[: c.num_documents]) + c.num_documents
    assert len(c.val_tokens) >= round(total * 0.1) and c.train_tokens[-1] == 0  # whole documents held out
    assert c.train_tokens.dtype == np.uint16 and c.tokenizer.vocab_size == 256
    assert 2.0 < c.unigram_entropy < math.log(256)
    again = load_corpus(cfg)
    assert np.array_equal(again.train_tokens, c.train_tokens)
    text = bytes(c.train_tokens[:200].astype(np.uint8)).decode("utf-8", errors="replace")
    assert "import" in text or '"""' in text or "#" in text


def _stream(c) -> bytes:
    return bytes(np.concatenate([c.train_tokens, c.val_tokens]).astype(np.uint8))


def _docs(docs) -> bytes:
    return b"".join(d.encode() + b"\0" for d in docs)  # every document ends with its end-of-document byte


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt"])
def test_local_files_through_datasets(tmp_path, fmt):
    docs = [f"document number {i} " * 20 for i in range(30)]
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
        paths = [str(path)]
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": docs}), path)
        paths = [str(path)]
    else:
        paths = []
        for i, d in enumerate(docs[:5]):
            (tmp_path / f"{i}.txt").write_text(d)
            paths.append(str(tmp_path / f"{i}.txt"))
        docs = docs[:5]
    cfg = DataConfig(source="files", paths=paths, text_field="body", val_fraction=0.1, cache_dir=str(tmp_path))
    c = load_corpus(cfg)
    assert _stream(c) == _docs(docs)


def test_hub_source_streams_a_dataset_repository_offline(tmp_path, monkeypatch):
    """data.source=hub goes through datasets.load_dataset(name, subset, split, streaming=True). A
    local directory laid out like a hub dataset repository (data/<split>-*.jsonl) is a valid name,
    so the whole path runs here with the hub switched off; split and text_field are honoured and
    max_bytes stops the stream."""
    import datasets.config

    # datasets reads the HF_*_OFFLINE variables at import: switch its flags off directly
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    train_docs = [f"train story {i} " * 10 for i in range(40)]
    (repo / "train-00000-of-00001.jsonl").write_text("".join(json.dumps({"story": d}) + "\n" for d in train_docs))
    (repo / "validation-00000-of-00001.jsonl").write_text(json.dumps({"story": "held out"}) + "\n")
    cfg = DataConfig(source="hub", name=str(tmp_path / "repo"), text_field="story", split="train", max_bytes=0,
                     val_fraction=0.0, cache_dir=str(tmp_path))
    c = load_corpus(cfg)
    assert _stream(c) == _docs(train_docs)
    one_doc = len(train_docs[0].encode())
    capped = load_corpus(DataConfig(**{**cfg.__dict__, "max_bytes": 3 * one_doc}))
    assert capped.num_documents == 3
    val = load_corpus(DataConfig(**{**cfg.__dict__, "split": "validation"}))
    assert _stream(val) == b"held out\0"
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a column of .*\['story'\]"):
        load_corpus(DataConfig(**{**cfg.__dict__, "text_field": "text"}))
    # the cache key (BPE and token caches) follows the directory's files, not just its name
    key = describe_source(cfg)
    (repo / "train-00000-of-00001.jsonl").write_text(json.dumps({"story": "edited"}) + "\n")
    assert describe_source(cfg) != key


def test_missing_text_field_is_one_line_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"data.text_field='text' is not a column .*\['content'\]"):
        load_corpus(DataConfig(source="files", paths=[str(path)], cache_dir=str(tmp_path)))


def test_bpe_tokenizer_is_trained_once_and_cached(tmp_path):
    path = tmp_path / "d.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    path.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % 5] for j in range(50))}) + "\n"
                            for i in range(40)))
    cfg = DataConfig(source="files", paths=[str(path)], tokenizer="bpe", bpe_vocab_size=400,
                     cache_dir=str(tmp_path / "cache"), val_fraction=0.05)
    c = load_corpus(cfg)
    assert c.tokenizer.vocab_size <= 400 and c.tokenizer.eos_id is not None
    assert len(c.train_tokens) + len(c.val_tokens) <= 40 * 50 + 40  # one token per word (+ eos): merged
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any(n.startswith("bpe-400-") for n in cached) and "prepared" in cached
    again = load_corpus(cfg)
    assert np.array_equal(again.train_tokens, c.train_tokens)
    ids = c.tokenizer.encode("alpha beta")
    assert c.tokenizer.decode(ids) == "alpha beta"
    # the same tokenizer file loads as data.tokenizer=hf from a local path
    bpe_file = next((tmp_path / "cache").glob("bpe-400-*.json"))
    hf = load_corpus(DataConfig(source="files", paths=[str(path)], tokenizer="hf", tokenizer_path=str(bpe_file),
                                cache_dir=str(tmp_path / "cache2"), val_fraction=0.05))
    assert np.array_equal(hf.train_tokens, c.train_tokens)


def test_unknown_file_format_is_one_line_error(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match=r"'.*a.csv' has no known format \(valid: "):
        load_corpus(DataConfig(source="files", paths=[str(tmp_path / "a.csv")]))

