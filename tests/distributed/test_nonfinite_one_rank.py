"""A non-finite loss, gradient or max logit on ONE of 2 gloo ranks: every rank skips the same step.

Each is injected on one rank only, at steps 2 and 3 of 4 with train.max_skipped_steps=1. What
carries it to the other rank: the loss is averaged over ranks, the gradients are reduced before
the global norm, and MuonClip's MAX reduction of the max logits reads a NaN as +inf on every
rank (gloo's MAX drops a NaN on rank 0, so the max logit is poisoned on each rank in turn).
Checked: both ranks skip steps 2 and 3, their weights stay equal to each other and to the
weights before each skipped step, metrics.jsonl records both skips, and the run stops after
step 3 with a TrainingError and a loadable checkpoint holding the weights of step 1. With
train.log_every=10, steps 2 and 3 are in metrics.jsonl only because skipped steps are always logged.

The ranks replicate the model (parallel.dp_replicate=2), so each holds its own full copy and a
rank that updated while the other skipped would show as two different models. On DeepSpeed
(ZeRO-2: each rank also holds the whole working weights) the gradient norm is DeepSpeed's, which
drops a step whose norm is not finite itself and reports it as inf.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from _spawn import spawn

POISONED = {2, 3}


def _cfg(engine: str = "fsdp2"):
    from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, ParallelConfig, ScheduleConfig,
                                   TrainConfig, TrainLoopConfig, validate)
    from kimi_train.model.config import ModelConfig

    model = ModelConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2)
    parallel = ParallelConfig(dp_replicate=2, dp_shard=1) if engine == "fsdp2" else \
        ParallelConfig(engine="deepspeed", zero_stage=2)
    cfg = TrainConfig(model=model, parallel=parallel,
                      train=TrainLoopConfig(steps=4, seq_len=32, micro_batch_size=2, log_every=10, val_every=0,
                                            val_batches=1, max_skipped_steps=1, dtype="fp32"),
                      schedule=ScheduleConfig(warmup_steps=0), data=DataConfig(max_bytes=60_000),
                      checkpoint=CheckpointConfig(every=0, keep=1),
                      logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False))
    return validate(cfg, dp_size=2)


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are NaN on this rank only."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def _poison(trainer, where: str) -> None:
    """Make ``where`` (loss, grad, max_logit) non-finite on this rank at the POISONED steps."""
    if where == "max_logit":
        layer = trainer.module.attention_layers()[1]
        forward = layer.forward

        def poisoned_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if trainer.step + 1 in POISONED:
                layer.max_logits = torch.full_like(layer.max_logits, math.nan)
            return out

        layer.forward = poisoned_forward
        return
    loss_fn = trainer._loss

    def poisoned_loss(batch):
        loss = loss_fn(batch)
        if trainer.step + 1 not in POISONED:
            return loss
        return loss * math.nan if where == "loss" else _NaNGrad.apply(loss)

    trainer._loss = poisoned_loss


def _weights(trainer) -> dict[str, torch.Tensor]:
    """This rank's own copy of every parameter and buffer (the expert biases included)."""
    def local(t):
        return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()

    return {k: local(v) for k, v in trainer.module.state_dict().items()}


def _worker(rank: int, world_size: int, run_dir: str, where: str, poisoned_rank: int, out: str,
            engine: str = "fsdp2") -> None:
    import warnings

    from kimi_train.errors import TrainingError
    from kimi_train.loop.trainer import Trainer

    cfg = _cfg(engine)
    trainer = Trainer(cfg, run_dir, OmegaConf.to_container(OmegaConf.structured(cfg)))
    if rank == poisoned_rank:
        _poison(trainer, where)
    steps = []  # (step, skipped, weights before, weights after)
    train_step = trainer.train_step

    def spy():
        before = _weights(trainer)
        record = train_step()
        steps.append((trainer.step + 1, bool(record.get("skipped")), before, _weights(trainer)))
        return record

    trainer.train_step = spy
    error = None
    faulthandler.dump_traceback_later(180, exit=True)  # ranks that skip different steps hang: fail instead
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit()
        except TrainingError as e:
            error = str(e)
    faulthandler.cancel_dump_traceback_later()
    torch.save({"steps": steps, "error": error}, f"{out}/rank{rank}.pt")


_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")


@pytest.mark.parametrize("where, poisoned_rank, engine", [
    ("loss", 1, "fsdp2"), ("grad", 1, "fsdp2"), ("max_logit", 0, "fsdp2"), ("max_logit", 1, "fsdp2"),
    pytest.param("grad", 1, "deepspeed", marks=_DEEPSPEED), pytest.param("max_logit", 1, "deepspeed", marks=_DEEPSPEED),
])
def test_a_non_finite_value_on_one_rank_is_skipped_by_every_rank(tmp_path, where, poisoned_rank, engine):
    from kimi_train.loop import checkpoint as ckpt
    from kimi_train.tools.run_model import load_model_from_run

    run_dir = tmp_path / "run"
    spawn(_worker, 2, str(run_dir), where, poisoned_rank, str(tmp_path), engine)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["error"] is not None and "2 skipped steps > train.max_skipped_steps=1" in r["error"], r["error"]
        assert [(step, skipped) for step, skipped, _, _ in r["steps"]] == [(1, False), (2, True), (3, True)]
        for step, skipped, before, after in r["steps"]:
            changed = [k for k in before if not torch.equal(before[k], after[k])]
            assert bool(changed) != skipped, (step, changed[:3])  # a skipped step changes nothing
    for (_, _, _, after0), (_, _, _, after1) in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert all(torch.equal(after0[k], after1[k]) for k in after0)  # the replicas never diverge

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("skipped"), r["skipped_steps"]) for r in records] == [
        (1, None, 0), (2, True, 1), (3, True, 2)]
    poisoned = records[1]
    if where == "loss":
        assert poisoned["loss"] == "nan"
    elif where == "grad":  # a finite mean loss; the NaN reaches rank 0 through the gradient reduction
        assert math.isfinite(poisoned["loss"]) and poisoned["grad_norm"] == ("nan" if engine == "fsdp2" else "inf")
    else:  # loss and gradients finite: only MuonClip's max-logit check refuses the step
        assert math.isfinite(poisoned["loss"]) and math.isfinite(poisoned["grad_norm"])

    assert ckpt.latest_checkpoint(run_dir) == ckpt.checkpoint_path(run_dir, 3)
    saved = load_model_from_run(run_dir).state_dict()
    step1 = ranks[0]["steps"][0][3]
    assert saved.keys() == step1.keys() and all(torch.equal(saved[k], step1[k]) for k in saved)
