"""The training loop: data -> model -> loss -> MuonClip step -> expert-bias update -> metrics/checkpoints.

One optimizer step (every rank), ``Trainer.train_step``:

    lr = schedule(step), written into every param group      # the logged lr is read back from them
    for each of A micro-batches:  loss = CE(model(x), y) / A;  loss.backward()
    grad_norm = clip_grad_norm_(params, optim.grad_clip)       # global norm, logged even without clipping
    if loss or grad_norm is not finite: skip the step (up to train.max_skipped_steps)
    optimizer.step()       # Muon/AdamW update, then (MuonClip) QK-Clip of the heads whose max logit
                           # in this step's forward was over tau (K2's order; a non-finite one: skip)
    update_expert_bias()   # aux-loss-free MoE balancing from this step's routed-token counts

On parallel.engine=deepspeed (kimi_train/parallel/deepspeed_engine.py) the same step runs through the
DeepSpeed engine: engine.backward per micro-batch (DeepSpeed divides by A), then one DeepSpeed step
that reduces, clips and measures the gradients and runs our MuonClip maths on its ZeRO partitions.

The step index is the batch index: a skipped step still consumes its batch and its
schedule slot, so a run always ends after train.steps batches.

Legend: B micro-batch size, T sequence length, V vocab size, A accumulation steps.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kimi_train.loop import checkpoint as ckpt
from kimi_train.config import TrainConfig, grad_accum_steps
from kimi_train.errors import TrainingError, UserError
from kimi_train.data import build_data
from kimi_train.data.tokenizer import TOKENIZER_DIR, save_pretrained
from kimi_train.loop.debug import debug_dump_grads
from kimi_train.loop.interrupt import StopOnSignal, debug_signal_at
from kimi_train.loop import run_record
from kimi_train.loop.metrics import MetricsLogger, flops_per_token, peak_flops
from kimi_train.loop.schedule import LRSchedule
from optim import NonFiniteMaxLogit, reduce_max_logits


GROUPED_GEMM_CHOICES = "grouped_gemm_choices.json"  # in the run directory


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, dp_group: Any = None,
                    check_finite: bool = True) -> torch.optim.Optimizer:
    """optim=muonclip -> optim.MuonClip; muon (or muonclip with qk_clip.enabled=false) -> optim.Muon;
    adamw -> torch.optim.AdamW over every parameter (the usual baseline). check_finite=False drops
    Muon's own non-finite-gradient check, for a caller that skips such steps before step()."""
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
    from optim import Muon, MuonClip, muon_param_groups

    kwargs = dict(lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                  ns_steps=o.ns_steps, ns_method=o.ns_method,
                  ns_dtype=o.ns_dtype, ns_backend=o.ns_backend,
                  adjust_lr=o.adjust_lr, adamw_betas=tuple(o.betas), adamw_eps=o.eps, check_finite=check_finite)
    groups = muon_param_groups(model, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "muonclip" and o.qk_clip.enabled:
        return MuonClip(groups, attention_layers=model.attention_layers(), tau=o.qk_clip.tau,
                        process_group=dp_group, **kwargs)
    return Muon(groups, **kwargs)


@torch.no_grad()
def read_max_logits(attention_layers: list, group: Any = None) -> dict[str, Any]:
    """Per-layer max logits without clipping, then reset: for optimizers without QK-Clip.

    MuonClip's reduction (MAX over ``group``; a NaN on any rank reads as +inf on every rank)."""
    S_L = reduce_max_logits(attention_layers, group)
    for layer in attention_layers:
        layer.reset_max_logits()
    values = [-math.inf if S_H is None else float(S_H.max()) for S_H in S_L]
    return {"max_logit": max(values) if values else None, "max_logit_per_layer": values,
            "clipped_heads": 0, "clipped_heads_per_layer": [0] * len(values)}


class Trainer:
    """Builds everything from a validated TrainConfig and runs `fit()` (every rank)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resolved_config: Optional[dict] = None):
        from kimi_train.model import KimiForCausalLM
        from kimi_train.parallel import ParallelDims, init_distributed, parallelize_model

        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.train
        self.rank, self.world_size, _, self.device = init_distributed()
        self.is_main = self.rank == 0
        # Before anything is built or written: may this config run in run_dir, and how? Every rank
        # reads the same files and decides alike; a refusal (UserError) or a finished run leaves
        # every file as it was (Hydra's record of this command included).
        try:
            self.rerun = run_record.check_rerun(self.run_dir, cfg)
        except UserError:
            run_record.drop_hydra_record(self.run_dir, self.is_main)
            raise
        if self.rerun.action == "finished":
            run_record.drop_hydra_record(self.run_dir, self.is_main)
            return  # fit() says so and writes nothing
        torch.set_num_threads(t.cpu_threads)  # part of the config: the count changes CPU results
        self.dims = ParallelDims.from_config(cfg.parallel, self.world_size, cfg.model)
        mesh = self.dims.build_mesh(self.device.type)
        self.accum = grad_accum_steps(cfg, self.dims.dp_size)
        self.global_batch = t.micro_batch_size * self.accum * self.dims.dp_size
        self.tokens_per_step = self.global_batch * t.seq_len

        # bf16 autocast on GPU by default, fp32 on CPU; the master weights stay fp32.
        use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

        # Data: memory-mapped token datasets (data=stdlib/files/hub: prepared into the cache by rank 0 first)
        self.data = build_data(cfg, self.dims.dp_rank, self.dims.dp_size, self.accum, self.is_main)
        self.train_loader, self.val_set = self.data.loader, self.data.val_set

        seed_everything(t.seed)
        with torch.device(self.device):
            model = KimiForCausalLM(cfg.model)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = flops_per_token(model, cfg.model, t.seq_len)
        self.deepspeed = cfg.parallel.engine == "deepspeed"
        if self.deepspeed:  # the engine wraps the model and partitions our optimizer's state
            from kimi_train.kernels.grouped_gemm import _expert_shapes
            from kimi_train.parallel.deepspeed_engine import apply_deepspeed

            gemm_shapes: Any = _expert_shapes(model)  # the GEMMs to tune, read before ZeRO-3 empties the weights
            self.model, self.optimizer = apply_deepspeed(model, cfg, self.dims.dp_size, self.accum, self.device)
        else:
            self.model = parallelize_model(model, self.dims, mesh, mixed_precision=use_bf16)
            gemm_shapes = self.model
            if t.compile:
                self.model.compile()  # in place: parameter names (and checkpoints) stay the same
            # train_step skips a step whose loss or global grad norm is not finite before optimizer.step()
            self.optimizer = build_optimizer(cfg, self.model, self.dims.dp_group, check_finite=False)
        # The model's own methods (attention_layers, moe_layers, ...); the DeepSpeed engine has a moe_layers of its own
        self.module = self.model.module if self.deepspeed else self.model
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        s = cfg.schedule
        self.schedule = LRSchedule(t.steps, s.warmup_steps, s.type, s.decay_fraction, s.decay_shape, s.min_lr_ratio)
        self.peak_flops = peak_flops(self.device, t.peak_flops)

        self.step, self.skipped_steps, self.tokens_seen = 0, 0, 0
        self.resumed_from: Optional[str] = None
        self._prepare_run_dir()
        if self.is_main:  # the run's tokenizer, loadable by transformers (kimi-train-export copies it)
            save_pretrained(self.data.tokenizer, self.run_dir / TOKENIZER_DIR, cfg.model.max_position_embeddings)
        # The grouped-GEMM kernel of every expert shape the run can hit, agreed by every rank and
        # kept in the run directory, so a resumed run computes with the same kernels.
        from kimi_train.kernels.grouped_gemm import tune_grouped_gemm

        most_rows = t.micro_batch_size * t.seq_len * cfg.model.num_experts_per_tok * self.dims.ep
        tune_grouped_gemm(gemm_shapes, most_rows, self.device, torch.bfloat16 if use_bf16 else torch.float32,
                          path=self.run_dir / GROUPED_GEMM_CHOICES)
        self.metrics = MetricsLogger(self.run_dir, self.is_main, self.step, cfg.logging.wandb,
                                     cfg.logging.wandb_project, cfg.run_name or self.run_dir.name, resolved_config)

    # ------------------------------------------------------------------ setup
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
            for name in ("metrics.jsonl", GROUPED_GEMM_CHOICES, run_record.SUMMARY_FILE):
                (self.run_dir / name).unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()
        latest = self.rerun.checkpoint  # verified by run_record.check_rerun (a damaged newer one: warned, passed)
        if self.cfg.resume == "auto" and latest is not None:
            state = ckpt.load_checkpoint(latest, self.model, self.optimizer, checksums=False)
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
    def _set_lr(self, step: int) -> float:
        """Write the schedule's lr for ``step`` into every param group; returns it, read back."""
        mult = self.schedule(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * mult
        return self.optimizer.param_groups[0]["lr"]

    def _loss(self, batch_BT1: torch.Tensor) -> torch.Tensor:
        batch_BT1 = batch_BT1.to(self.device, non_blocking=True)
        x_BT, y_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
        with self.autocast():
            logits_BTV = self.model(x_BT)
        return F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten())

    def _mean_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dims.dp_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.dims.dp_group)
            value /= self.dims.dp_size
        return value

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch (see the module docstring); its record."""
        lr = self._set_lr(self.step)
        self.model.train()
        micro_batches = self.train_loader.next_batch()
        loss = self._forward_backward(micro_batches)
        debug_dump_grads(self)
        if self.deepspeed:  # the norm, its clipping and the drop of a non-finite one happen in DeepSpeed's step
            loss_f = float(loss)
            outcome = self.optimizer.step(drop=None if math.isfinite(loss_f) else f"non-finite loss={loss_f}")
            record: dict[str, Any] = {"loss": loss_f, "lr": lr, "grad_norm": outcome.grad_norm}
            if outcome.skipped:
                self._skip_step(outcome.skipped)
                return {**record, "skipped": True}
        else:
            max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
            loss_f, grad_norm_f = float(loss), float(self._clip_grad_norm(max_norm))
            record = {"loss": loss_f, "lr": lr, "grad_norm": grad_norm_f}
            if not (math.isfinite(loss_f) and math.isfinite(grad_norm_f)):
                self._skip_step(f"non-finite loss={loss_f} / grad_norm={grad_norm_f}")
                return {**record, "skipped": True}
            try:
                self.optimizer.step()  # MuonClip: checks the max logits before it changes anything
            except NonFiniteMaxLogit as e:  # every rank sees it (the MAX reduce keeps it as +inf)
                self._skip_step(f"non-finite max logit ({e})")
                return {**record, "skipped": True}
        self.optimizer.zero_grad(set_to_none=True)
        clip = getattr(self.optimizer, "last_stats", None)
        if clip is None:
            clip = read_max_logits(self.module.attention_layers(), self.dims.dp_group)
        record.update(max_logit=clip["max_logit"], max_logit_per_layer=clip["max_logit_per_layer"],
                      clipped_heads=clip["clipped_heads"], clipped_heads_per_layer=clip["clipped_heads_per_layer"])
        if self.cfg.logging.post_step_max_logit and self._is_logged(self.step + 1):  # before the bias update
            post = self._post_step_max_logits(micro_batches)
            record.update(max_logit_post_step=post["max_logit"],
                          max_logit_post_step_per_layer=post["max_logit_per_layer"])
        from kimi_train.model import update_expert_bias

        balance = update_expert_bias(self.module.moe_layers(), rate=self.cfg.train.expert_bias_rate,
                                     group=self.dims.dp_group)
        record.update(expert_load_imbalance=balance["max_imbalance"] if balance["imbalance_per_layer"] else None,
                      expert_load_imbalance_per_layer=balance["imbalance_per_layer"] or None)
        return record

    def _forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate the gradients of the global batch; its mean loss over every rank."""
        loss_sum = torch.zeros((), device=self.device)
        sync = getattr(self.model, "set_requires_gradient_sync", None)  # FSDP2: sync only on the last one
        for i, mb in enumerate(micro_batches):
            if sync is not None:
                sync(i == len(micro_batches) - 1)
            loss = self._loss(mb)
            if self.deepspeed:  # DeepSpeed divides by its gradient_accumulation_steps (= self.accum) itself
                self.model.backward(loss)
                if i < len(micro_batches) - 1:
                    self.model.step()  # off the accumulation boundary: DeepSpeed only counts the micro-batch
            else:
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        return self._mean_over_dp(loss_sum / self.accum)

    @torch.no_grad()
    def _post_step_max_logits(self, micro_batches: list[torch.Tensor]) -> dict[str, Any]:
        """Max logits of the weights after this step's update and QK-Clip, on this step's own batch.

        The logged ``max_logit`` comes from the step's forward, before its update and clip; this
        one separates what the clip leaves (tau on the clipped heads, times the growth of the
        update it was applied after) from batch-to-batch variation (docs/stability.md). It runs
        before the expert-bias update; measure_max_logits leaves the routed-token counts alone.
        """
        for mb in micro_batches:
            with self.autocast():
                self.module.measure_max_logits(mb[:, :-1].to(self.device, non_blocking=True))
        return read_max_logits(self.module.attention_layers(), self.dims.dp_group)

    def _clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global gradient norm before clipping to max_norm (works across the EP and dense meshes)."""
        from kimi_train.parallel import clip_grad_norm_

        return clip_grad_norm_(self.model.parameters(), max_norm)

    def _skip_step(self, reason: str) -> None:
        """Drop this step's gradients and records. reason: what was not finite. fit() logs every
        skipped step and, after train.max_skipped_steps of them, saves and stops."""
        self.optimizer.zero_grad(set_to_none=True)
        for layer in self.module.attention_layers():
            layer.reset_max_logits()
        for moe in self.module.moe_layers():
            moe.tokens_per_expert.zero_()
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
        for batch in self.val_set:
            total += self._loss(batch) * batch.shape[0]
        self.model.train()
        return float(self._mean_over_dp(total)) * self.dims.dp_size / self.data.num_val

    # ------------------------------------------------------------------ loop
    def _trainer_state(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "tokens_seen": self.tokens_seen,
                "data": self.train_loader.state_dict(), "schedule": dataclasses.asdict(self.schedule),
                "engine": self.cfg.parallel.engine}

    def save(self) -> None:
        if not ckpt.all_finite(self.model, self.optimizer):
            raise TrainingError(f"step {self.step}: the model or optimizer state has non-finite values; "
                                "refusing to write a checkpoint (the previous one is kept)")
        ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self._trainer_state(),
                             keep=self.cfg.checkpoint.keep)

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
                if too_many or stopping:
                    if bar is not None:
                        bar.close()
                    self._write_summary(last, time.perf_counter() - start,
                                        stopped="too many skipped steps" if too_many else "signal")
                    self.metrics.close()
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
            + (f" ({dist.get_backend()}, {self._engine_name()})" if dist.is_initialized() else ""),
            self.data.header(),
            f"batch: {self.global_batch} x {self.cfg.train.seq_len} tokens per step "
            f"({self.cfg.train.micro_batch_size} per micro-batch, {self.accum} accumulation steps), "
            f"{self.cfg.train.steps} steps",
        ]
        print("\n".join(lines), flush=True)

    def _engine_name(self) -> str:
        return f"DeepSpeed ZeRO-{self.cfg.parallel.zero_stage}" if self.deepspeed else "FSDP2"

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
