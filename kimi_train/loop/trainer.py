"""The training loop: data -> model -> loss -> engine step -> expert-bias update -> metrics/checkpoints.

One optimizer step (every rank), ``Trainer.train_step``, through the engine the config names
(``kimi_train.parallel.engine.TrainEngine``: FSDP2 with EP, or DeepSpeed ZeRO; the trainer never
asks which):

    loss = engine.forward_backward(micro_batches, CE)      # mean over the A micro-batches; gradients accumulated
    outcome = engine.step(lr = schedule(step) * optim.lr)  # clip to optim.grad_clip (the norm is logged either way),
                                                           # update, then (MuonClip) QK-Clip of the heads whose max
                                                           # logit in this step's forward was over tau (K2's order);
                                                           # a non-finite loss, grad norm or max logit: nothing changes
    if outcome.skipped: count it (after train.max_skipped_steps of them, save and stop)
    engine.balance_experts()   # aux-loss-free MoE balancing from this step's routed-token counts

The step index is the batch index: a skipped step still consumes its batch and its
schedule slot, so a run always ends after train.steps batches.

Legend: B micro-batch size, T sequence length, A accumulation steps.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from kimi_train.loop import checkpoint as ckpt
from kimi_train.config import TrainConfig, grad_accum_steps
from kimi_train.errors import TrainingError, UserError
from kimi_train.data import build_data
from kimi_train.data.tokenizer import TOKENIZER_DIR, save_pretrained
from kimi_train.loop.debug import debug_dump_grads, debug_slow_prepare
from kimi_train.loop.interrupt import StopOnSignal, debug_signal_at
from kimi_train.loop import run_record
from kimi_train.loop.metrics import MetricsLogger, flops_per_token, peak_flops
from kimi_train.loop.schedule import LRSchedule
from kimi_train.model import KimiForCausalLM
from kimi_train.parallel import ParallelDims, build_engine, init_distributed, once_per_node
from kimi_train.parallel.engine import TrainEngine, autocast, causal_lm_inputs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Builds everything from a validated TrainConfig and runs `fit()` (every rank).

    ``engine_factory``: what wraps the model into the engine that trains it, called as
    ``engine_factory(cfg, model, dims, mesh, device, accum, mixed_precision)`` (default:
    ``kimi_train.parallel.build_engine``, which picks by parallel.engine)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resolved_config: Optional[dict] = None,
                 engine_factory: Callable[..., TrainEngine] = build_engine):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world_size, _, self.device = init_distributed(
            timeout_s=cfg.parallel.timeout_s, init_timeout_s=cfg.parallel.init_timeout_s)
        self.is_main = self.rank == 0
        self.rerun = self._check_rerun()
        if self.rerun.action == "finished":
            return  # fit() says so and writes nothing
        torch.set_num_threads(cfg.train.cpu_threads)  # part of the config: the count changes CPU results
        mesh = self._set_up_batch()
        self._build_data()
        self._build_engine(engine_factory, mesh)
        s, t = cfg.schedule, cfg.train
        self.schedule = LRSchedule(t.steps, s.warmup_steps, s.type, s.decay_fraction, s.decay_shape, s.min_lr_ratio)
        self.peak_flops = peak_flops(self.device, t.peak_flops)
        self.step, self.skipped_steps, self.tokens_seen = 0, 0, 0
        self.resumed_from: Optional[str] = None
        self._prepare_run_dir()
        if self.is_main:  # the run's tokenizer, loadable by transformers (kimi-train-export copies it)
            save_pretrained(self.data.tokenizer, self.run_dir / TOKENIZER_DIR, cfg.model.max_position_embeddings)
        self.metrics = MetricsLogger(self.run_dir, self.is_main, self.step, cfg.logging.wandb,
                                     cfg.logging.wandb_project, cfg.run_name or self.run_dir.name, resolved_config)

    # ------------------------------------------------------------------ setup
    def _check_rerun(self) -> run_record.Rerun:
        """Before anything is built or written: may this config run in run_dir, and how? Every rank
        reads the same files and decides alike; a refusal (UserError) or a finished run leaves
        every file as it was (Hydra's record of this command included)."""
        try:
            rerun = run_record.check_rerun(self.run_dir, self.cfg)
        except UserError:
            run_record.drop_hydra_record(self.run_dir, self.is_main)
            raise
        if rerun.action == "finished":
            run_record.drop_hydra_record(self.run_dir, self.is_main)
        return rerun

    def _set_up_batch(self) -> Any:
        """The data-parallel layout and the batch it implies; returns the device mesh (None: one process)."""
        cfg, t = self.cfg, self.cfg.train
        self.dims = ParallelDims.from_config(cfg.parallel, self.world_size, cfg.model)
        mesh = self.dims.build_mesh(self.device.type)
        self.accum = grad_accum_steps(cfg, self.dims.dp_size)
        self.global_batch = t.micro_batch_size * self.accum * self.dims.dp_size
        self.tokens_per_step = self.global_batch * t.seq_len
        # bf16 autocast on GPU by default, fp32 on CPU; the master weights stay fp32.
        self.bf16 = t.dtype == "bf16" or (t.dtype == "auto" and self.device.type == "cuda")
        return mesh

    def _build_data(self) -> None:
        # Data: memory-mapped token datasets; data=stdlib/files/hub are prepared into the cache once
        # (rank 0 first, then each node's first rank), the other ranks waiting outside any collective.
        self.data = build_data(self.cfg, self.dims.dp_rank, self.dims.dp_size, self.accum, self.is_main,
                               once=lambda fn: once_per_node(lambda: debug_slow_prepare(fn), "data"))
        self.train_loader, self.val_set = self.data.loader, self.data.val_set

    def _build_engine(self, engine_factory: Callable[..., TrainEngine], mesh: Any) -> None:
        """The model, from the seed, wrapped in its engine; ``model``/``optimizer``/``module`` are the engine's."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        with torch.device(self.device):
            model = KimiForCausalLM(cfg.model)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = flops_per_token(model, cfg.model, cfg.train.seq_len)
        self.engine = engine_factory(cfg, model, self.dims, mesh, self.device, self.accum, self.bf16)

    @property
    def model(self) -> torch.nn.Module:
        """What runs the forward (the engine's wrapper of the model)."""
        return self.engine.model

    @property
    def module(self) -> torch.nn.Module:
        """The model itself (its attention_layers(), moe_layers(), ...)."""
        return self.engine.module

    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    def _prepare_run_dir(self) -> None:
        """Start or resume as self.rerun (run_record.check_rerun) decided; rank 0 writes config.yaml:
        the whole config, so with accepted changes (safe keys, a longer schedule) it says what trains
        from here on, and every key that shapes the steps before is the same as it was."""
        if self.cfg.resume == "never" and self.is_main:
            # A fresh run in this directory: old checkpoints/metrics would be mixed with the new ones.
            if ckpt.checkpoints_root(self.run_dir).exists() or (self.run_dir / "metrics.jsonl").exists():
                print(f"resume=never: removing the previous run's checkpoints, metrics and summary in {self.run_dir}",
                      file=sys.stderr)
            shutil.rmtree(ckpt.checkpoints_root(self.run_dir), ignore_errors=True)
            shutil.rmtree(self.run_dir / "plots", ignore_errors=True)
            for name in ("metrics.jsonl", run_record.SUMMARY_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()
        latest = self.rerun.checkpoint  # verified by run_record.check_rerun (a damaged newer one: warned, passed)
        if self.cfg.resume == "auto" and latest is not None:
            state = ckpt.load_checkpoint(latest, self.engine, checksums=False)
            self.step, self.skipped_steps = state["step"], state["skipped_steps"]
            self.tokens_seen = state["tokens_seen"]
            self.train_loader.load_state_dict(state["data"])
            self.resumed_from = str(latest)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_record.write_config(self.run_dir, self.cfg)
            run_record.adopt_hydra_record(self.run_dir)
            if self.rerun.changed:
                print(self.rerun.changes_message(), file=sys.stderr, flush=True)
        self._session_start = (self.step, self.tokens_seen)

    # ------------------------------------------------------------------ one step
    def _loss(self, batch_BT1: torch.Tensor) -> torch.Tensor:
        x_BT, y_BT = causal_lm_inputs(batch_BT1, self.device)
        with autocast(self.device, self.bf16):  # an fp32 loss; over chunks of model.loss_chunk_tokens tokens when > 0
            return self.model(x_BT, labels=y_BT)

    def _mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dims.dp_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.dims.dp_group)
            value /= self.dims.dp_size
        return value

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the next global batch; the record to log (``skipped``: it changed nothing)."""
        lr = self.cfg.optim.lr * self.schedule(self.step)
        self.model.train()
        micro_batches = self.train_loader.next_batch()
        loss = float(self._mean_over_dp(self.engine.forward_backward(micro_batches, self._loss)))
        debug_dump_grads(self)
        outcome = self.engine.step(lr, drop=None if math.isfinite(loss) else f"non-finite loss={loss}")
        record: dict[str, Any] = {"loss": loss, "lr": lr, "grad_norm": outcome.grad_norm}
        if outcome.skipped:
            self._skip_step(f"{outcome.skipped} (grad_norm={outcome.grad_norm})")
            return {**record, "skipped": True}
        clip = outcome.clip
        record.update(max_logit=clip["max_logit"], max_logit_per_layer=clip["max_logit_per_layer"],
                      clipped_heads=clip["clipped_heads"], clipped_heads_per_layer=clip["clipped_heads_per_layer"])
        if self.cfg.logging.post_step_max_logit and self._is_logged(self.step + 1):  # before the bias update
            post = self._post_step_max_logits(micro_batches)
            record.update(max_logit_post_step=post["max_logit"],
                          max_logit_post_step_per_layer=post["max_logit_per_layer"])
        balance = self.engine.balance_experts(self.cfg.train.expert_bias_rate)
        record.update(expert_load_imbalance=balance["max_imbalance"] if balance["imbalance_per_layer"] else None,
                      expert_load_imbalance_per_layer=balance["imbalance_per_layer"] or None)
        return record

    @torch.no_grad()
    def _post_step_max_logits(self, micro_batches: list[torch.Tensor]) -> dict[str, Any]:
        """Max logits of the weights after this step's update and QK-Clip, on this step's own batch.

        The logged ``max_logit`` comes from the step's forward, before its update and clip; this
        one separates what the clip leaves (tau on the clipped heads, times the growth of the
        update it was applied after) from batch-to-batch variation (docs/stability.md). It runs
        before the expert-bias update; measure_max_logits leaves the routed-token counts alone.
        """
        return self.engine.measure_max_logits(micro_batches)

    def _skip_step(self, reason: str) -> None:
        """Count a step the engine skipped (it changed nothing). reason: what was not finite. fit()
        logs every skipped step and, after train.max_skipped_steps of them, saves and stops."""
        self.skipped_steps += 1
        self._skip_reason = reason
        if self.is_main:
            warnings.warn(f"step {self.step + 1}: {reason}; step skipped "
                          f"({self.skipped_steps}/{self.cfg.train.max_skipped_steps})", stacklevel=2)

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean loss over the fixed validation windows (eval mode: no max-logit/expert-load records); the
        same windows at every dp size and micro-batch size, so the same value up to summation order."""
        if not self.data.num_val:  # the same on every rank
            return None
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for rows, loss in zip(self.data.val_rows, self.engine.evaluate(self.val_set, self._loss)):
            total += loss * rows  # 0 rows: a filler batch (data/loader.py build_data)
        self.model.train()
        return float(self._mean_over_dp(total)) * self.dims.dp_size / self.data.num_val

    # ------------------------------------------------------------------ loop
    def _trainer_state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
                "data": self.train_loader.state_dict(), "schedule": dataclasses.asdict(self.schedule),
                "engine": self.engine.name}

    def save(self) -> None:
        if not self.engine.state_is_finite():
            raise TrainingError(f"step {self.step}: the model or optimizer state has non-finite values; "
                                "refusing to write a checkpoint (the previous one is kept)")
        ckpt.save_checkpoint(self.run_dir, self.step, self.engine, self._trainer_state(), keep=self.cfg.checkpoint.keep)

    def _is_logged(self, step: int) -> bool:
        """Whether fit() logs the record of (1-based) step ``step``."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps or step == 1

    def fit(self) -> dict[str, Any]:
        """Train to train.steps. SIGINT/SIGTERM: finish the step, save, raise Interrupted (exit 130/143);
        more than train.max_skipped_steps skipped steps: save the last good weights, raise TrainingError."""
        if self.rerun.action == "finished":  # run_record.check_rerun: nothing to train, nothing written
            return self._finish(None, 0.0)
        t, every = self.cfg.train, self.cfg.checkpoint.every
        self._print_header()
        bar = None
        if self.is_main and self.cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=t.steps, initial=self.step, dynamic_ncols=True, desc="train")
        train_time, interval_tokens, last = 0.0, 0, None
        start = time.perf_counter()
        with StopOnSignal(self.device, verbose=self.is_main) as stop:
            while self.step < t.steps:
                debug_signal_at(self.rank, self.step + 1)
                t0 = time.perf_counter()
                record = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                train_time += dt
                interval_tokens += self.tokens_per_step
                is_last = self.step == t.steps
                if self._is_logged(self.step) or record.get("skipped"):  # every skipped step is logged
                    tps = interval_tokens / max(train_time, 1e-9)
                    record.update(step=self.step, tokens=self.tokens_seen, tokens_per_s=tps,
                                  skipped_steps=self.skipped_steps, elapsed_s=time.perf_counter() - start)
                    if len(self.train_loader.sources) > 1:  # a mixture: tokens drawn from each source
                        record.update({f"data_tokens/{k}": v for k, v in self.train_loader.realized_tokens().items()})
                    if self.step == 1:
                        record["unigram_entropy"] = self.data.unigram_entropy  # the loss to beat, nats/token
                    if self.peak_flops:
                        record["mfu"] = tps * self.flops_per_token / (self.peak_flops * self.world_size)
                    if t.val_batches and ((t.val_every and self.step % t.val_every == 0) or is_last):
                        record["val_loss"] = self.evaluate()
                    record = {"step": record.pop("step"), **record}
                    self.metrics.log(record)
                    last = record
                    train_time, interval_tokens = 0.0, 0
                    if bar is not None:
                        bar.set_postfix(_postfix(record), refresh=False)
                    elif self.is_main:
                        print(" ".join(f"{k}={v}" for k, v in _postfix(record).items()), flush=True)
                if bar is not None:
                    bar.update(1)
                # A skipped step changes no weight: after too many, the saved state is the last good one.
                too_many = record.get("skipped") and self.skipped_steps > t.max_skipped_steps
                stopping = stop.requested() and not is_last  # every rank, every step: one tiny all-reduce
                if (every and self.step % every == 0) or is_last or too_many or stopping:
                    self.save()
                    # A signal during a periodic save: stop on the checkpoint just written, not one step later.
                    stopping = stopping or (not is_last and stop.requested())
                if too_many or stopping:
                    if bar is not None:
                        bar.close()
                    self._write_summary(last, time.perf_counter() - start,
                                        stopped="too many skipped steps" if too_many else "signal")
                    self.metrics.close()
                    if dist.is_initialized():  # no rank exits (and no launcher kills rank 0) before summary.json is written
                        dist.barrier()
                if too_many:
                    raise TrainingError(
                        f"step {self.step}: {self._skip_reason}, {self.skipped_steps} skipped steps > "
                        f"train.max_skipped_steps={t.max_skipped_steps}; lower optim.lr or check the data "
                        f"(the last good weights are saved as step {self.step})")
                if stopping:
                    raise stop.interrupted(self.step)
            if bar is not None:
                bar.close()
            return self._finish(last, time.perf_counter() - start)

    def _print_header(self) -> None:
        if not self.is_main:
            return
        lines = [
            f"run_dir: {self.run_dir}" + (f" (resumed from {Path(self.resumed_from).name})" if self.resumed_from else ""),
            f"model: {self.num_params / 1e6:.2f}M parameters, {self.cfg.model.num_hidden_layers} layers; "
            f"optimizer: {type(self.optimizer).__name__}; device: {self.device}; ranks: {self.world_size}"
            + (f" ({dist.get_backend()}, {self.engine.description})" if dist.is_initialized() else ""),
            self.data.header(),
            f"batch: {self.global_batch} x {self.cfg.train.seq_len} tokens per step "
            f"({self.cfg.train.micro_batch_size} per micro-batch, {self.accum} accumulation steps), "
            f"{self.cfg.train.steps} steps",
        ]
        print("\n".join(lines), flush=True)

    def _finish(self, last: Optional[dict], elapsed: float) -> dict[str, Any]:
        """summary.json (run_record.summarize: this session appended to the run's), plots, one line.
        A finished run's rerun writes nothing and returns its summary as it is."""
        if self.rerun.action == "finished":
            if self.is_main:
                print(self.rerun.finished_message(self.run_dir), flush=True)
            return run_record.read_summary(self.run_dir) or {}
        summary = self._write_summary(last, elapsed)
        self.metrics.summary(summary)
        self.metrics.close()
        if self.is_main:
            if self.cfg.logging.plots and last is not None:
                from kimi_train.analysis.plots import plot_runs

                plot_runs([self.run_dir], self.run_dir / "plots")
            print(f"done: loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None else "done",
                  f"(unigram entropy {self.data.unigram_entropy:.3f}); outputs in {self.run_dir}", flush=True)
        return summary


    def _write_summary(self, last: Optional[dict], elapsed: float, stopped: Optional[str] = None) -> dict[str, Any]:
        """summary.json with this session appended (run_record.summarize); also for a session that
        stopped early (``stopped``: why), so the run's totals count every session's time and tokens."""
        start_step, start_tokens = self._session_start
        session = {"start_step": start_step, "end_step": self.step, "elapsed_s": elapsed,
                   "tokens": self.tokens_seen - start_tokens, "cpu_threads": torch.get_num_threads(),
                   "resumed_from": self.resumed_from}
        if stopped:
            session["stopped"] = stopped
        if self.rerun.changed:
            session["changed"] = {k: list(v) for k, v in self.rerun.changed.items()}
        totals = {"run_dir": str(self.run_dir), "steps": self.step, "skipped_steps": self.skipped_steps,
                  "tokens": self.tokens_seen, "unigram_entropy": self.data.unigram_entropy,
                  "data_tokens": self.train_loader.realized_tokens(),
                  "num_params": self.num_params, "resumed_from": self.resumed_from}  # this session's
        previous = run_record.read_summary(self.run_dir) if self.resumed_from else None
        summary = run_record.summarize(previous, session, totals, last)
        if self.is_main:
            run_record.write_summary(self.run_dir, summary)
        return summary


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    out = {"step": str(record["step"]), "loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
    if record.get("max_logit") is not None:
        out["max_logit"] = f"{record['max_logit']:.1f}"
    if record.get("val_loss") is not None:
        out["val"] = f"{record['val_loss']:.4f}"
    out["tok/s"] = f"{record['tokens_per_s']:.0f}"
    return out
