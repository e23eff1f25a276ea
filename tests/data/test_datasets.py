"""Training-side data: the global order, mixtures, the held-out split, foreign formats, refusals."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi_train.config import DataConfig, MixSource, TrainConfig, TrainLoopConfig
from kimi_train.data.dataset import open_dataset
from kimi_train.data.errors import DataError
from kimi_train.data.loader import PackedWindows, TrainLoader, build_data
from kimi_train.data.order import interleave, permute
from kimi_train.data.prepare import MANIFEST, prepare
from kimi_train.data.tokenizer import ByteTokenizer
from kimi_train.model.config import ModelConfig


def _prepared(tmp: Path, name: str, docs: list[str]) -> Path:
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(source="files", paths=[str(src)], max_bytes=0)
    return prepare(cfg, tmp / name, ByteTokenizer(), progress=False)


def _cfg(data: DataConfig, steps: int = 10, **train) -> TrainConfig:
    return TrainConfig(data=data, model=ModelConfig(vocab_size=256),
                       train=TrainLoopConfig(steps=steps, **{"seq_len": 16, "micro_batch_size": 2, **train}))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    a = _prepared(tmp, "a", [f"alpha {i} " * 9 for i in range(200)])
    b = _prepared(tmp, "b", [f"BETA {i}! " * 5 for i in range(40)])
    return a, b


def test_permutation_is_a_bijection_keyed_by_every_part_of_its_key():
    for n in (1, 2, 3, 17, 1000, 4097):
        assert sorted(permute(np.arange(n), n, 5, 0, 2).tolist()) == list(range(n))
    base = permute(np.arange(50), 50, 0, 0, 0)
    for key in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert not np.array_equal(permute(np.arange(50), 50, *key), base)


def test_every_mixture_prefix_is_within_one_sample_of_its_target():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = rng.random(int(rng.integers(2, 6))) ** 3 + 1e-3
        target = w / w.sum()
        counts = np.zeros(len(w), dtype=np.int64)
        drawn = np.zeros(len(w))
        for k, chunk in enumerate([interleave(counts, w, 37) for _ in range(20)]):  # resumed every 37 samples
            for j, s in enumerate(chunk):
                drawn[s] += 1
                assert np.abs(drawn - target * (37 * k + j + 1)).max() < 1
        assert np.array_equal(drawn, counts)


def _windows(n=5000, seq=16, offset=0):
    return PackedWindows((np.arange(n, dtype=np.int64) + offset) % 251, seq)


def test_mixture_loader_resumes_exactly_at_another_dp_size_and_counts_tokens():
    sources, w = [_windows(), _windows(900, offset=7)], [3.0, 1.0]
    whole = TrainLoader(sources, 4, 2, seed=1, weights=w)  # dp 1, accumulation 2: global batch 8
    batches = [torch.cat(whole.next_batch()) for _ in range(40)]  # source 1 (56 windows) repeats
    ranks = [TrainLoader(sources, 4, 1, dp_rank=r, dp_size=2, seed=1, weights=w) for r in range(2)]
    for i in range(15):
        assert torch.equal(torch.cat([torch.cat(r.next_batch()) for r in ranks]), batches[i])
    resumed = TrainLoader(sources, 4, 2, seed=1, weights=w)
    resumed.load_state_dict(json.loads(json.dumps(ranks[1].state_dict())))
    for i in range(15, 40):
        assert torch.equal(torch.cat(resumed.next_batch()), batches[i])
    assert resumed.realized_tokens() == {"source0": 240 * 16, "source1": 80 * 16}
    assert (resumed.planned_epochs(40) > 1).tolist() == [False, True]


def test_an_epoch_of_a_source_visits_each_of_its_windows_once():
    w = _windows(16 * 64 + 1)
    loader = TrainLoader(w, 8, 1, seed=3)
    seen = torch.cat([torch.cat(loader.next_batch()) for _ in range(8)])
    assert sorted(seen[:, 0].tolist()) == sorted(((np.arange(64) * 16) % 251).tolist())
    assert loader.epoch == 1


def test_training_data_from_a_two_source_mixture(two):
    a, b = two
    data = DataConfig(source="prepared", mix=[MixSource(str(a), 3.0), MixSource(str(b), 1.0)], val_sequences=6)
    d1 = build_data(_cfg(data), 0, 1, 2)
    d2 = [build_data(_cfg(data), r, 2, 1) for r in range(2)]
    assert d1.num_val == 6 and all(x.num_val == 6 for x in d2)  # 5 windows of a, 1 of b: by weight
    val1 = sorted(map(tuple, torch.cat(d1.val_set).tolist()))
    assert val1 == sorted(map(tuple, torch.cat([torch.cat(x.val_set) for x in d2]).tolist()))
    assert sum(bytes(r[:-1]).count(b"BETA") > 0 for r in torch.cat(d1.val_set).to(torch.uint8).numpy()) == 1
    # the held-out split starts at a document: its first token follows an end-of-document token
    ds = open_dataset([str(a)], data)
    cut = ds.split(data.val_fraction)
    assert ds.read(cut - 1, 1)[0] == 0 and 0.01 <= 1 - cut / ds.num_tokens < 0.05
    assert d1.train_tokens + d1.val_tokens == ds.num_tokens + open_dataset([str(b)], data).num_tokens
    batch = torch.cat(d1.loader.next_batch())
    assert batch.shape == (4, 17)
    with pytest.raises(DataError, match=r"data.mix\[1\].max_epochs=2.0 but .*b' would be read .* times over train.steps=1000"):
        build_data(_cfg(DataConfig(source="prepared", mix=[MixSource(str(a), 3.0), MixSource(str(b), 1.0, 2.0)]),
                        steps=1000), 0, 1, 1)


def test_refusals_are_one_line(two, tmp_path):
    a, b = two
    bpe_dir = tmp_path / "bpe"
    bpe_cfg = DataConfig(source="files", paths=[str(Path(b).parent / "b.jsonl")], max_bytes=0, tokenizer="bpe",
                         bpe_vocab_size=300, cache_dir=str(tmp_path))
    from kimi_train.data.loader import build_tokenizer

    prepare(bpe_cfg, bpe_dir, build_tokenizer(bpe_cfg), progress=False)
    mixed = DataConfig(source="prepared", mix=[MixSource(str(a)), MixSource(str(bpe_dir))])
    with pytest.raises(DataError, match=r"have different tokenizers \(bpe300 vs byte\); mix datasets prepared with one"):
        build_data(_cfg(mixed), 0, 1, 1)
    too_big = TrainConfig(data=DataConfig(source="prepared", paths=[str(bpe_dir)]), model=ModelConfig(vocab_size=256))
    with pytest.raises(DataError, match="the tokenizer has 300 tokens but model.vocab_size=256"):
        build_data(too_big, 0, 1, 1)
    # a changed manifest and a truncated shard
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    m = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**m, "tokens": m["tokens"] + 1}))
    with pytest.raises(DataError, match="manifest.json' was changed after prepare"):
        open_dataset([str(bad)], DataConfig())
    (bad / MANIFEST).write_text(json.dumps(m))
    with open(bad / "shard-00000.bin", "r+b") as f:
        f.truncate(m["shards"][0]["bin_bytes"] - 2)
    with pytest.raises(DataError, match=r"shard-00000.bin' has \d+ bytes but the manifest says \d+: damaged"):
        open_dataset([str(bad)], DataConfig())
    # a checkpoint of another dataset
    loader = build_data(_cfg(DataConfig(source="prepared", paths=[str(a)])), 0, 1, 1).loader
    other = build_data(_cfg(DataConfig(source="prepared", paths=[str(b)])), 0, 1, 1).loader
    with pytest.raises(DataError, match="the checkpoint's data loader has num_windows="):
        other.load_state_dict(loader.state_dict())


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron-core's builder, numpy 2's copy keyword
def test_we_train_on_what_megatron_writes_and_on_raw_token_files(tmp_path):
    mi = _megatron()
    docs = [np.array(list(f"doc {i} ".encode() * (i % 5 + 2)) + [0], dtype=np.uint16) for i in range(60)]
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "meg.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    builder.finalize(str(tmp_path / "meg.idx"))
    stream = np.concatenate(docs)
    cfg = DataConfig(source="prepared", paths=[str(tmp_path / "meg")], tokenizer="byte", val_sequences=2)
    ds = open_dataset(cfg.paths, cfg)
    assert ds.num_documents == 60 and np.array_equal(ds.read(0, ds.num_tokens), stream)
    cut = ds.split(0.1)
    assert cut in np.cumsum([len(d) for d in docs]) and ds.num_tokens - cut >= 0.1 * ds.num_tokens
    data = build_data(_cfg(cfg), 0, 1, 1)
    assert torch.equal(data.loader.sources[0].gather([3])[0], torch.from_numpy(stream[48:65].astype(np.int64)))
    # nanoGPT's raw uint16 train.bin and OLMo's raw .npy: the same tokens, the same held-out split
    stream.tofile(tmp_path / "train.bin")
    stream.astype(np.uint32).tofile(tmp_path / "part.npy")
    for name, dtype in (("train.bin", "uint16"), ("part.npy", "uint32")):
        raw = DataConfig(source="prepared", paths=[str(tmp_path / name)], tokenizer="byte", dtype=dtype, eod_id=0)
        rds = open_dataset(raw.paths, raw)
        assert np.array_equal(rds.read(0, rds.num_tokens), stream) and rds.split(0.1) == cut
    with pytest.raises(DataError, match="is a raw token file; give its dtype, e.g. data.dtype=uint16"):
        open_dataset([str(tmp_path / "train.bin")], DataConfig(tokenizer="byte"))


def test_megatron_reads_a_prepared_dataset_document_for_document(two):
    mi = _megatron()
    a, _ = two
    ours = open_dataset([str(a)], DataConfig())
    theirs = mi.IndexedDataset(str(a / "shard-00000"))
    starts = np.concatenate([[0], np.cumsum(theirs.sequence_lengths)])
    assert len(theirs) == ours.num_documents == 200
    for i in (0, 1, 117, 199):
        doc = np.array(theirs[i], copy=True)
        assert np.array_equal(doc, ours.read(int(starts[i]), len(doc)))
        assert bytes(doc.astype(np.uint8)) == f"alpha {i} ".encode() * 9 + b"\0"
