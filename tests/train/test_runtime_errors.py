"""A user's mistake found while running is ONE line naming the value, exit code 2, no traceback.

Through the command line (subprocess): the run directory, data files, the tokenizer, a
resume with another batch, a model config, a missing optional package; in-process: the
layers that raise them (data loader, parallel layout), the other commands (export,
inspect, report, plot), `kimi-train --help`, and a default run that prints no warning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL, run_cli

def one_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process's one stderr line, after checking the exit code."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kimi-train: ")
    return lines[0]


def small(tmp_path: Path, *extra: str) -> list[str]:
    return [*SMALL, "train.steps=2", f"run_dir={tmp_path / 'run'}", *extra]


# ------------------------------------------------------------------------------- the run directory
def test_run_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line(run_cli([*SMALL, "train.steps=2", f"run_dir={tmp_path / 'file' / 'run'}"]))
    assert f"run_dir='{tmp_path / 'file' / 'run'}' cannot be created: '{tmp_path / 'file'}' is a file" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 directory anyway")
def test_unwritable_run_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_line(run_cli([*SMALL, "train.steps=2", f"run_dir={locked}"]))
    assert f"run_dir='{locked}' is not writable" in line


def test_multirun_sweep_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    line = one_line(run_cli(["-m", *SMALL, "train.steps=2", f"run_dir={tmp_path / 'file' / 'sweep'}",
                             "optim=adamw,muon"]))
    assert f"run_dir='{tmp_path / 'file' / 'sweep'}' cannot be created" in line


# ------------------------------------------------------------------------------- data and tokenizer
def test_missing_data_file(tmp_path):
    line = one_line(run_cli(small(tmp_path, "data=files", "data.paths=[/nope.txt]")))
    assert line == "kimi-train: data.paths: '/nope.txt' does not exist"


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    line = one_line(run_cli(small(tmp_path, "data=files", f"data.paths=[{tmp_path / 'empty.txt'}]")))
    assert line == f"kimi-train: data.paths: '{tmp_path / 'empty.txt'}' is empty"


def test_missing_tokenizer_path(tmp_path):
    line = one_line(run_cli(small(tmp_path, "data.tokenizer=hf", "data.tokenizer_path=/nope/tokenizer.json")))
    assert "data.tokenizer_path='/nope/tokenizer.json' does not exist" in line


def test_tokenizer_larger_than_the_model_vocab(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {chr(0x4E00 + i): i for i in range(299)} | {"[UNK]": 299}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    line = one_line(run_cli(small(tmp_path, "data.tokenizer=hf", f"data.tokenizer_path={tmp_path / 'tokenizer.json'}")))
    assert "the tokenizer has 300 tokens but model.vocab_size=256" in line


def test_missing_optional_package(tmp_path):
    shim = tmp_path / "shim"  # `import datasets` fails as it does where the package is not installed
    shim.mkdir()
    (shim / "datasets.py").write_text("raise ModuleNotFoundError(\"No module named 'datasets'\", name='datasets')\n")
    proc = run_cli(small(tmp_path, "data=hub", "data.name=some/dataset", "data.tokenizer=byte"),
                   env_extra={"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])})
    line = one_line(proc)
    assert "data.source=hub needs the 'datasets' package, which is not installed; pip install 'kimi-train[data]'" in line


# ------------------------------------------------------------------------------- resume and layout
def test_resume_with_another_micro_batch(tmp_path):
    first = run_cli(small(tmp_path, "checkpoint.every=1"))
    assert first.returncode == 0, first.stderr[-2000:]
    line = one_line(run_cli(small(tmp_path, "train.micro_batch_size=2")))
    # refused by the run directory's record of the config, or else by the data loader's state
    assert "train.micro_batch_size: 4 -> 2" in line or "global_batch=4 but this run has 2" in line


def test_loader_refuses_a_checkpoint_of_another_global_batch():
    """The world size changed under parallel.dp_shard=-1: same config, another global batch."""
    import numpy as np

    from kimi_train.data import PackedWindows, TrainLoader
    from kimi_train.errors import UserError

    windows = PackedWindows(np.arange(5000, dtype=np.int32) % 251, 16)
    saved = TrainLoader(windows, micro_batch_size=4, grad_accum=1, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(UserError, match=r"global_batch=8 but this run has 4 \(windows per step: "):
        TrainLoader(windows, micro_batch_size=4, grad_accum=1).load_state_dict(saved)


def test_parallel_layout_errors_are_user_errors():
    from kimi_train.errors import UserError
    from kimi_train.parallel import ParallelDims

    with pytest.raises(UserError, match="parallel.ep=3 must divide parallel.dp_shard=4"):
        ParallelDims.from_config({"dp_shard": 4, "ep": 3}, world_size=4)
    with pytest.raises(UserError, match="the world size is 4"):
        ParallelDims.from_config({"dp_replicate": 1, "dp_shard": 3}, world_size=4)


def test_unknown_model_config(tmp_path):
    line = one_line(run_cli(small(tmp_path, "model=huge")))
    assert "model='huge' is not a known config; valid values: k2, k2_mini, small, tiny" in line


def test_missing_package_is_named_and_a_broken_one_keeps_its_traceback(monkeypatch, tmp_path):
    from kimi_train.data.errors import DataError, require

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(DataError, match=r"data.tokenizer=bpe needs the 'tokenizers' package.*kimi-train\[data\]"):
        require("tokenizers", "data.tokenizer=bpe")
    (tmp_path / "broken_pkg.py").write_text("import a_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_missing"):  # a broken install: a bug
        require("broken_pkg", "x")


def test_bpe_without_tokenizers_through_load_corpus(monkeypatch, tmp_path):
    from kimi_train.config import DataConfig
    from kimi_train.data import load_corpus
    from kimi_train.errors import UserError

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match="data.tokenizer=bpe needs the 'tokenizers' package"):
        load_corpus(DataConfig(max_bytes=20_000, tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path)))


# ------------------------------------------------------------------------------- the other commands
def _tool_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def _fake_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "lr": 1e-3}) + "\n"
                                                for s in (1, 2)))
    return path


def test_export_errors(tmp_path, capsys):
    from kimi_train.tools.hf import main

    (tmp_path / "file").write_text("x")
    assert "does not exist" in _tool_error(main, [str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert "is a file" in _tool_error(main, [str(tmp_path / "file"), str(tmp_path / "out")], capsys)
    assert "has no config.yaml" in _tool_error(main, [str(tmp_path), str(tmp_path / "out")], capsys)
    assert "unknown option '--forse'" in _tool_error(main, ["a", "b", "--forse"], capsys)


def test_inspect_errors(tmp_path, capsys):
    from kimi_train.tools.inspect_model import main

    assert "unknown model config '/nope.yaml'" in _tool_error(main, ["model=/nope.yaml"], capsys)
    (tmp_path / "bad.yaml").write_text("hidden_size: [1,\n")
    assert f"model='{tmp_path / 'bad.yaml'}' cannot be read" in _tool_error(main, [f"model={tmp_path / 'bad.yaml'}"],
                                                                            capsys)
    assert "parallel.ep=3" in _tool_error(main, ["parallel.ep=3"], capsys)


def test_report_errors(tmp_path, capsys):
    from kimi_train.analysis.report import main

    assert "has no metrics.jsonl" in _tool_error(main, [str(tmp_path / "nope")], capsys)
    run = _fake_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    err = _tool_error(main, [str(run), "--json", str(tmp_path / "file" / "r.json")], capsys)
    assert "is a file, not a directory" in err
    err = _tool_error(main, [str(run), "--plots", str(tmp_path / "file" / "plots")], capsys)
    assert f"--plots='{tmp_path / 'file' / 'plots'}' cannot be created" in err


def test_plot_errors(tmp_path, capsys):
    from kimi_train.analysis.plots import main

    assert "has no metrics.jsonl" in _tool_error(main, [str(tmp_path / "nope")], capsys)
    run = _fake_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    err = _tool_error(main, [str(run), "--out", str(tmp_path / "file" / "plots")], capsys)
    assert f"plots directory='{tmp_path / 'file' / 'plots'}' cannot be created" in err


# ------------------------------------------------------------------------------- help, quiet defaults
def test_help_lists_the_groups_a_user_chooses():
    from kimi_train.train import CONFIG_DIR

    proc = subprocess.run([sys.executable, "-m", "kimi_train.train", "--help"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "base_" not in proc.stdout
    groups = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
    for group in groups:  # every option on disk, in the group's line of the help
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{group}:"))
        listed = {word.strip(",") for word in line.split()[1:]}
        options = {p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")}
        assert options <= listed, (group, options - listed)
    assert "optim:" in proc.stdout and "train:\n  steps: 300" in proc.stdout  # the config is still shown


def test_default_run_prints_no_warning(tmp_path):
    """The default run, only shorter: wandb offline, plots, progress bar; nothing filtered."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PYTHONWARNINGS", "HYDRA_"))}
    proc = subprocess.run([sys.executable, "-m", "kimi_train.train", "train.steps=2", "data.max_bytes=200000",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "warn" not in out.lower() and "Traceback" not in out and "wandb:" not in out, out
    bar = [line for line in re.split(r"[\r\n]+", proc.stderr) if line.strip()]
    assert bar and all(line.startswith("train: ") for line in bar), proc.stderr  # stderr: the progress bar only
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))  # wandb did log, offline
    assert (tmp_path / "run" / "plots" / "loss.png").is_file()


def test_hydra_adds_no_line_of_its_own(tmp_path):
    """Hydra writes 'Error executing job with overrides: [...]' before re-raising an Exception that
    leaves the job; kimi_train/train.py carries its errors past Hydra instead."""
    proc = run_cli(small(tmp_path, "data=files", "data.paths=[/nope.txt]"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
