"""The Trainer drives any TrainEngine: here a stub that records what it is asked and answers with
outcomes of its own, so every logged figure can be traced to the engine and nowhere else."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_train.errors import TrainingError
from kimi_train.loop.trainer import Trainer
from kimi_train.parallel.engine import StepOutcome, TrainEngine

from conftest import read_metrics
from test_trainer import small_cfg


class StubEngine:
    """A TrainEngine with a plain model, SGD, and outcomes it makes up: step n reports grad norm
    n + 0.5, max logit 10 n and n clipped heads, and the steps in ``skip`` are skipped."""

    name = "stub"
    description = "a stub engine"
    skip: set[int] = set()

    def __init__(self, cfg, model, dims, mesh, device, accum, mixed_precision):
        self.model = self.module = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
        self.accum, self.calls, self.steps = accum, [], 0
        self.loaded = None

    def forward_backward(self, micro_batches, loss_fn):
        self.calls.append(("forward_backward", len(micro_batches)))
        losses = [loss_fn(mb) for mb in micro_batches]
        for loss in losses:
            (loss / len(losses)).backward()
        return sum(loss.detach() for loss in losses) / len(losses)

    def step(self, lr, drop=None):
        self.steps += 1
        n = self.steps
        self.calls.append(("step", lr, drop))
        layers = len(self.module.attention_layers())
        if drop is not None or n in self.skip:
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(n + 0.5, drop or f"the stub skips step {n}")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clip = {"max_logit": 10.0 * n, "max_logit_per_layer": [10.0 * n] * layers, "clipped_heads": n,
                "clipped_heads_per_layer": [n] + [0] * (layers - 1)}
        return StepOutcome(n + 0.5, None, clip)

    def balance_experts(self, rate):
        self.calls.append(("balance_experts", rate))
        return {"imbalance_per_layer": [1.25], "max_imbalance": 1.25, "mean_imbalance": 1.25}

    def read_max_logits(self):
        raise AssertionError("only for logging.post_step_max_logit")

    def evaluate(self, batches, loss_fn):
        return [loss_fn(batch) for batch in batches]

    def measure_max_logits(self, micro_batches):
        raise AssertionError("only for logging.post_step_max_logit")

    def state_dict(self, checkpoint=None):
        return {"model": self.model.state_dict(), "stub": {"steps": torch.tensor(self.steps)}}

    def load_state_dict(self, state):
        self.loaded = state
        self.model.load_state_dict(state["model"])
        self.steps = int(state["stub"]["steps"])

    def state_is_finite(self):
        return True


def _trainer(tmp_path, skip=(), **train) -> Trainer:
    StubEngine.skip = set(skip)
    trainer = Trainer(small_cfg(**train), tmp_path, engine_factory=StubEngine)
    assert isinstance(trainer.engine, StubEngine) and isinstance(trainer.engine, TrainEngine)
    return trainer


def test_the_trainer_drives_a_stub_engine_and_logs_what_it_reports(tmp_path):
    trainer = _trainer(tmp_path, steps=3, global_batch_size=8)  # 2 micro-batches of 4
    assert trainer.model is trainer.engine.model and trainer.optimizer is trainer.engine.optimizer
    summary = trainer.fit()
    records = read_metrics(tmp_path)
    assert summary["steps"] == 3 and [r["step"] for r in records] == [1, 2, 3]
    calls = trainer.engine.calls
    assert [c[0] for c in calls] == ["forward_backward", "step", "balance_experts"] * 3
    assert all(c[1] == 2 for c in calls if c[0] == "forward_backward")
    rate = trainer.cfg.train.expert_bias_rate
    assert all(c[1] == rate for c in calls if c[0] == "balance_experts")
    lrs = [c[1] for c in calls if c[0] == "step"]
    assert lrs == [trainer.cfg.optim.lr * trainer.schedule(s) for s in range(3)]
    for n, r in enumerate(records, start=1):
        assert (r["grad_norm"], r["max_logit"], r["clipped_heads"]) == (n + 0.5, 10.0 * n, n)
        assert r["lr"] == lrs[n - 1] and r["expert_load_imbalance"] == 1.25 and math.isfinite(r["loss"])


def test_a_skipped_outcome_is_counted_and_the_step_goes_no_further(tmp_path):
    trainer = _trainer(tmp_path, skip={2}, steps=3)
    with pytest.warns(UserWarning, match=r"step 2: the stub skips step 2 \(grad_norm=2.5\); step skipped \(1/1\)"):
        trainer.fit()
    records = read_metrics(tmp_path)
    assert [r.get("skipped", False) for r in records] == [False, True, False]
    assert "max_logit" not in records[1] and records[1]["grad_norm"] == 2.5
    assert trainer.skipped_steps == 1 and records[-1]["skipped_steps"] == 1
    names = [c[0] for c in trainer.engine.calls]
    assert names == ["forward_backward", "step", "balance_experts", "forward_backward", "step",
                     "forward_backward", "step", "balance_experts"]  # no expert-bias update for the skipped step


def test_too_many_skipped_outcomes_stop_the_run(tmp_path):
    trainer = _trainer(tmp_path, skip={2, 3}, steps=4)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=r"step 3: the stub skips step 3 .*"
                                                                        r"2 skipped steps > train.max_skipped_steps=1"):
        trainer.fit()


def test_checkpoints_hold_the_engines_own_state_and_restore_it(tmp_path):
    trainer = _trainer(tmp_path, steps=4)
    for _ in range(2):
        trainer.train_step()
        trainer.step += 1
    trainer.save()
    saved = {k: v.clone() for k, v in trainer.engine.state_dict()["model"].items()}
    resumed = _trainer(tmp_path, steps=4)
    assert resumed.step == 2 and resumed.resumed_from.endswith("step_00000002")
    loaded = resumed.engine.loaded
    assert int(loaded["stub"]["steps"]) == 2 and resumed.engine.steps == 2
    assert all(torch.equal(loaded["model"][k], v) for k, v in saved.items())


def test_the_default_engine_is_a_train_engine(tmp_path):
    trainer = Trainer(small_cfg(steps=1), tmp_path)
    assert isinstance(trainer.engine, TrainEngine) and trainer.engine.name == "fsdp2"
