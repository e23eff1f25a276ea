"""train.activation_checkpointing through the real Trainer: selective and full give the steps of
``none`` (loss, grad norm, max logit and clipped heads per layer, expert load per layer, fp32: the
issue asks 1e-6 relative; they are bit-identical, the recomputation replays the same ops), in one process and on 2 gloo ranks with expert parallelism 2; and a recomputed
EP layer issues no collective (its backward runs the same all-to-alls as without checkpointing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _spawn import spawn
from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, ParallelConfig, QKClipConfig,
                               TrainConfig, TrainLoopConfig, validate)  # fmt: skip
from kimi_train.loop.trainer import Trainer
from kimi_train.model import load_model_config

MODES = [("selective", False), ("selective", True), ("full", False)]
COMPARED = ("loss", "grad_norm", "max_logit_per_layer", "clipped_heads_per_layer", "expert_load_imbalance_per_layer")


def config(mode: str, down: bool, parallel: dict, world: int) -> TrainConfig:
    model = load_model_config(
        "tiny", hidden_size=64, num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2, q_lora_rank=24,
        moe_intermediate_size=32, intermediate_size=128, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_logits_chunk=32,
    )  # fmt: skip
    cfg = TrainConfig(
        model=model,
        optim=OptimConfig(name="muonclip", lr=0.02, ns_dtype="fp32", ns_backend="torch", grad_clip=2.0,
                          qk_clip=QKClipConfig(tau=0.05)),
        train=TrainLoopConfig(steps=6, seq_len=32, micro_batch_size=2, global_batch_size=8, log_every=1, val_every=0,
                              val_batches=0, dtype="fp32", activation_checkpointing=mode, recompute_moe_down_proj=down),
        data=DataConfig(max_bytes=60_000), parallel=ParallelConfig(**parallel), checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False),
    )  # fmt: skip
    return validate(cfg, dp_size=world)


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _fit_modes(root: str, parallel: dict, world: int) -> dict:
    """Each mode's run, one after the other in this process (one process group for all)."""
    for mode, down in [("none", False), *MODES]:
        Trainer(config(mode, down, parallel, world), Path(root) / f"{mode}-{down}").fit()
    return {(mode, down): _steps(Path(root) / f"{mode}-{down}") for mode, down in [("none", False), *MODES]}


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 6
    assert sum(r["clipped_heads"] for r in want) > 0  # QK-Clip fires: the clipped heads are compared, not all 0
    for g, w in zip(got, want):
        for key in COMPARED:
            assert g[key] == w[key], (w["step"], key, g[key], w[key])


@pytest.mark.parametrize("mode,down", MODES)
def test_one_process_steps_equal_none(tmp_path_factory, mode, down, _one_process={}):
    if not _one_process:
        _one_process.update(_fit_modes(str(tmp_path_factory.mktemp("ac")), {}, 1))
    _assert_same(_one_process[(mode, down)], _one_process[("none", False)])


class _Collectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace in ("_c10d_functional", "_c10d_functional_autograd", "c10d")
        return func(*args, **(kwargs or {}))


def _backward_collectives(mode: str) -> int:
    """Collectives in the backward of one EP forward (this rank's model, full layer stack)."""
    from torch.distributed.device_mesh import init_device_mesh

    from kimi_train.model import KimiForCausalLM
    from kimi_train.parallel import apply_ep
    from kimi_train.parallel.activation_checkpoint import apply_activation_checkpointing

    cfg = config(mode, False, {"ep": 2}, 2).model
    torch.manual_seed(0)
    model = KimiForCausalLM(cfg)
    apply_ep(model, init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))["ep"])
    apply_activation_checkpointing(model, mode).train()
    loss = model(torch.randint(0, 256, (2, 32))).logsumexp(-1).mean()
    with _Collectives() as census:
        loss.backward()
    return census.count


def _rank(rank: int, world: int, root: str):
    steps = _fit_modes(root, {"ep": 2}, world)
    census = {mode: _backward_collectives(mode) for mode in ("none", "selective", "full")}
    return (steps, census) if rank == 0 else None


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    return spawn(_rank, 2, str(tmp_path_factory.mktemp("ac_ep2")), timeout_s=240)[0]


@pytest.mark.parametrize("mode,down", MODES)
def test_ep2_steps_equal_none(ep2, mode, down):
    steps, _ = ep2
    _assert_same(steps[(mode, down)], steps[("none", False)])


def test_a_recomputed_ep_layer_issues_no_collective(ep2):
    _, census = ep2
    assert census["none"] > 0  # the combine's backward all-to-all (and the dispatch's) per MoE layer
    assert census["selective"] == census["full"] == census["none"], census
