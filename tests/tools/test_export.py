"""kimi-train-export from a training run: the tokenizer loads with transformers.AutoTokenizer and
gives our ids; a non-empty OUT_DIR is refused without --force; files get the usual permissions."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, ScheduleConfig,  # noqa: E402
                               TrainConfig, TrainLoopConfig, validate)
from kimi_train.data import load_corpus  # noqa: E402
from kimi_train.loop.trainer import Trainer  # noqa: E402
from kimi_train.model.config import ModelConfig  # noqa: E402
from kimi_train.tools.hf import main  # noqa: E402

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld, 日本語 🙂", "a\x00b  \t trailing ", "Ā <|endoftext|> x", ""]


def _train(run_dir: Path, cache: Path, **data) -> TrainConfig:
    model = ModelConfig(vocab_size=512, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    cfg = validate(TrainConfig(
        model=model, train=TrainLoopConfig(steps=2, seq_len=32, micro_batch_size=4, val_every=0, val_batches=1),
        schedule=ScheduleConfig(warmup_steps=0), data=DataConfig(max_bytes=60_000, cache_dir=str(cache), **data),
        checkpoint=CheckpointConfig(every=0, keep=1),
        logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False)))
    Trainer(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg))).fit()  # writes config.yaml
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"byte": (root / "byte", _train(root / "byte", root / "cache")),
            "bpe": (root / "bpe", _train(root / "bpe", root / "cache", tokenizer="bpe", bpe_vocab_size=300))}


def _export(src: Path, out: Path, capsys, *flags: str) -> dict:
    main([str(src), str(out), *flags])
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_exported_tokenizer_gives_our_ids(kind, runs, tmp_path, capsys):
    run, cfg = runs[kind]
    assert _export(run, tmp_path / "hf", capsys)["tokenizer"] is True
    ours = load_corpus(cfg.data).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == text  # a round trip, the eos token included
    assert theirs.eos_token_id == ours.eos_id
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == ours.eos_id
    assert len(theirs) == ours.vocab_size == (256 if kind == "byte" else 300)


def test_run_without_a_saved_tokenizer_is_rebuilt_from_its_config(runs, tmp_path, capsys):
    run, cfg = runs["bpe"]
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    shutil.rmtree(old / "tokenizer")  # a run from before the trainer kept its tokenizer
    _export(old, tmp_path / "hf", capsys)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs(TEXTS[0])["input_ids"] == load_corpus(cfg.data).tokenizer.encode(TEXTS[0])
    assert not (old / "tokenizer").exists()  # the source run is left as it was


def test_reexport_of_an_hf_directory_keeps_the_tokenizer(runs, tmp_path, capsys):
    run, cfg = runs["bpe"]
    _export(run, tmp_path / "a", capsys)
    (tmp_path / "a" / "generation_config.json").write_text("{}")  # the model's files stay behind
    _export(tmp_path / "a", tmp_path / "b", capsys, "--rope-interleave")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "b"))
    assert theirs(TEXTS[1])["input_ids"] == load_corpus(cfg.data).tokenizer.encode(TEXTS[1])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["rope_interleave"] is True


def test_non_empty_out_dir_needs_force(runs, tmp_path, capsys):
    run, _ = runs["byte"]
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        main([str(run), str(out)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert f"OUT_DIR '{out}' is not empty; pass a new or empty directory, or --force" in err
    assert (out / "model-00001-of-00002.safetensors").exists()  # nothing touched
    _export(run, out, capsys, "--force")
    assert not (out / "model-00001-of-00002.safetensors").exists()  # would shadow the new weights
    assert (out / "notes.txt").read_text() == "mine"
    transformers.AutoModelForCausalLM.from_pretrained(str(out))


def test_files_get_the_usual_permissions(runs, tmp_path, capsys):
    run, _ = runs["bpe"]
    old = os.umask(0o022)
    try:
        _export(run, tmp_path / "hf" / "nested", capsys)
    finally:
        os.umask(old)
    for path in [tmp_path / "hf", *sorted((tmp_path / "hf").rglob("*"))]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path.name, oct(mode))
    names = {p.name for p in (tmp_path / "hf" / "nested").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
