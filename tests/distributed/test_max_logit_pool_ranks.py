"""QK-Clip's re-measure pool on 2 gloo ranks, FSDP 2 x EP 2: ranks whose pools differ in size.

The pool is per rank, so one rank may have more candidate sequences to re-measure than another;
the forwards are collective (FSDP all-gathers, EP all-to-alls), so every rank must run as many.
Rank 0 starts with a pool of 5 extra sequences (5 forwards of 2 with its batch and 2 scanned
windows), rank 1 with none (2 forwards): the step must complete, and the clip must hold over both
ranks' candidates. The same with the passes run before each forward (optim.qk_clip.lookahead),
where a NaN max logit on one rank skips the step on both.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from _spawn import spawn

pytestmark = pytest.mark.slow

TAU = 0.05


def _worker(rank: int, world: int, run_dir: str, out: str, lookahead: bool) -> None:
    from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, ParallelConfig, ScheduleConfig,
                                   TrainConfig, TrainLoopConfig, validate)
    from kimi_train.model.config import ModelConfig
    from kimi_train.trainer import Trainer

    model = ModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    cfg = TrainConfig(model=model, parallel=ParallelConfig(ep=2),
                      train=TrainLoopConfig(steps=2, seq_len=32, micro_batch_size=2, log_every=1, val_every=0,
                                            val_batches=1),
                      schedule=ScheduleConfig(warmup_steps=0), data=DataConfig(max_bytes=60_000),
                      checkpoint=CheckpointConfig(every=0, keep=1),
                      logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False))
    cfg.optim.lr, cfg.optim.qk_clip.tau = 0.05, TAU
    q = cfg.optim.qk_clip
    q.remeasure, q.remeasure_pool, q.remeasure_scan = 1, 2, 2  # the scan draws other windows on each rank
    q.lookahead = lookahead
    trainer = Trainer(validate(cfg), run_dir)
    if rank == 0:
        g = torch.Generator().manual_seed(7)
        trainer.pool.sequences = torch.randint(0, 256, (5, 33), generator=g)
    records = []
    for _ in range(2):
        records.append(trainer.train_step())
        trainer.step += 1
    # layer 0's max over this rank's pool (which holds its candidates' per-head maxima), the
    # max over ranks: the clip is exact on the union (MuonClip reduces the max logits over ranks)
    candidates, per_NLH = trainer._remeasure(trainer.pool.sequences, last=True)
    for layer in trainer.model.attention_layers():
        layer.reset_max_logits()
    layer0 = per_NLH[:, 0].amax(0)
    dist.all_reduce(layer0, op=dist.ReduceOp.MAX)
    result = {"pool": len(trainer.pool), "layer0": layer0, "clipped": [r["clipped_heads"] for r in records],
              "forward": [r["max_logit_per_layer"][0] for r in records]}
    if lookahead:  # a NaN max logit on rank 1 alone in the pass before the forward: both ranks skip
        remeasure = trainer._remeasure

        def nan_on_rank_1(*args, **kwargs):
            out = remeasure(*args, **kwargs)
            if rank == 1:
                trainer.model.attention_layers()[0].max_logits[0] = float("nan")
            return out

        trainer._remeasure = nan_on_rank_1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result["nan_step"] = trainer.train_step()
        result["skipped_steps"] = trainer.skipped_steps
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        torch.save(results, out)


@pytest.mark.parametrize("lookahead", [False, True])
def test_ranks_with_pools_of_different_sizes(tmp_path, lookahead):
    out = tmp_path / "result.pt"
    spawn(_worker, 2, str(tmp_path / "run"), str(out), lookahead)
    r0, r1 = torch.load(out)
    assert r0["clipped"] == r1["clipped"] and sum(r0["clipped"]) > 0
    assert r0["pool"] > 0 and r1["pool"] > 0
    torch.testing.assert_close(r0["layer0"], r1["layer0"])
    if lookahead:
        # the clip came before each forward: the steps' own forwards, layer 0 over both ranks, were
        # bounded (the pool is measured after the last update, so it may be over tau again)
        assert r0["forward"] == r1["forward"] and max(r0["forward"]) <= TAU * (1 + 1e-5)
        assert max(r0["forward"]) == pytest.approx(TAU, rel=1e-5)
        assert r0["nan_step"]["skipped"] and r1["nan_step"]["skipped"]
        assert r0["skipped_steps"] == r1["skipped_steps"] == 1
        return
    assert float(r0["layer0"].max()) == pytest.approx(TAU, rel=1e-5)
    assert bool((r0["layer0"] <= TAU * (1 + 1e-5)).all())
