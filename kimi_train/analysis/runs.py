"""Run directories as data: the figures of one training run (RunSummary) and the helpers that read them.

A run directory holds metrics.jsonl (one record per logged step, written by the trainer) and
config.yaml (the resolved config). A directory that has no metrics.jsonl but whose
subdirectories do (a Hydra multirun sweep directory) stands for all of them
(expand_run_dirs). See report.py for what each figure means.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kimi_train.analysis.plots import read_metrics


@dataclass
class RunSummary:
    """The figures of one run (one row of the table)."""

    run_dir: str
    label: str
    # adamw | muon | muonclip (qk_clip.enabled=false reads as muon)
    optimizer: str
    lr: Optional[float]
    tau: Optional[float]  # only when QK-Clip is on
    steps: int
    final_loss: float
    best_loss: float
    final_val_loss: Optional[float]
    peak_max_logit: Optional[float]
    heads_clipped: int
    first_clip_step: Optional[int]
    max_logit_after_first_clip: Optional[float]  # tau is a soft cap: ~1.2-1.5 tau at small batch
    median_max_logit_after_first_clip: Optional[float]
    # logging.post_step_max_logit: the updated, clipped weights on the step's own batch, from the
    # first clip's step on (that step's value is already after the clip)
    max_post_step_after_first_clip: Optional[float]
    median_post_step_after_first_clip: Optional[float]
    tokens_per_s: Optional[float]
    elapsed_s: Optional[float]
    smooth: int = 1  # the loss figures and curves are means over this many logged records
    steps_to_target: Optional[int] = None
    target_ratio: Optional[float] = None
    # per logged record, for plots: step, (smoothed) loss, max logit over layers
    curve_steps: list[int] = field(default_factory=list, repr=False)
    curve_loss: list[float] = field(default_factory=list, repr=False)
    curve_max_logit: list[float] = field(default_factory=list, repr=False)
    val_steps: list[int] = field(default_factory=list, repr=False)
    val_loss: list[float] = field(default_factory=list, repr=False)


def _float(value: Any) -> float:
    return float(value) if value is not None else math.nan  # float("inf") / float("nan") read the strings


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of dicts, ordered by step (a line cut by a crash is skipped)."""
    records = [r for r in read_metrics(run_dir) if "step" in r and r.get("loss") is not None]
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no logged steps yet")
    return sorted(records, key=lambda r: r["step"])


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path itself if it holds metrics.jsonl, else its subdirectories that do (a sweep directory)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            out.append(p)
            continue
        children = sorted(c for c in p.glob("*") if (c / "metrics.jsonl").is_file()) if p.is_dir() else []
        if not children:
            raise ValueError(f"{p} has no metrics.jsonl, nor subdirectories with one; pass kimi-train run directories")
        out.extend(children)
    return out


def _optim_info(run_dir: Path) -> tuple[str, Optional[float], Optional[float]]:
    """(optimizer, lr, tau) from config.yaml; ("?", None, None) without one."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        return "?", None, None
    from omegaconf import OmegaConf

    optim = OmegaConf.to_container(OmegaConf.load(cfg_file)).get("optim", {}) or {}
    name = str(optim.get("name", "?"))
    clip_on = name == "muonclip" and bool((optim.get("qk_clip") or {}).get("enabled", True))
    if name == "muonclip" and not clip_on:
        name = "muon"
    lr = optim.get("lr")
    tau = (optim.get("qk_clip") or {}).get("tau") if clip_on else None
    return name, (float(lr) if lr is not None else None), (float(tau) if tau is not None else None)


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` values (the first ones average what there is)."""
    if window < 1:
        raise ValueError(f"smoothing window {window} is not valid; use an integer >= 1")
    # Each window summed afresh: a running sum would carry one inf/nan into every later value.
    return [math.fsum(values[max(0, i - window + 1): i + 1]) / min(i + 1, window) for i in range(len(values))]


def summarise(run_dir: str | Path, smooth: int = 1, label: Optional[str] = None) -> RunSummary:
    """The figures of one run directory."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    optimizer, lr, tau = _optim_info(run_dir)
    steps = [int(r["step"]) for r in records]
    loss = smoothed([_float(r["loss"]) for r in records], smooth)
    logits = [_float(r.get("max_logit")) for r in records]
    finite_logits = [v for v in logits if not math.isnan(v) and v != -math.inf]
    clipped = [int(r.get("clipped_heads") or 0) for r in records]
    first_clip = next((s for s, c in zip(steps, clipped) if c > 0), None)
    after = [v for s, v in zip(steps, logits) if first_clip is not None and s > first_clip and not math.isnan(v)]
    post = [_float(r["max_logit_post_step"]) for s, r in zip(steps, records)
            if first_clip is not None and s >= first_clip and r.get("max_logit_post_step") is not None]
    post = [v for v in post if not math.isnan(v)]
    tps = [_float(r.get("tokens_per_s")) for r in records[1:] if r.get("tokens_per_s") is not None]
    if not tps and records[0].get("tokens_per_s") is not None:
        tps = [_float(records[0]["tokens_per_s"])]
    vals = [(int(r["step"]), _float(r["val_loss"])) for r in records if r.get("val_loss") is not None]
    finite_loss = [v for v in loss if math.isfinite(v)]
    return RunSummary(
        run_dir=str(run_dir),
        label=label or run_dir.name,
        optimizer=optimizer,
        lr=lr,
        tau=tau,
        steps=steps[-1],
        final_loss=loss[-1],
        best_loss=min(finite_loss) if finite_loss else math.nan,
        final_val_loss=vals[-1][1] if vals else None,
        peak_max_logit=max(finite_logits) if finite_logits else None,
        heads_clipped=sum(clipped),
        first_clip_step=first_clip,
        max_logit_after_first_clip=max(after) if after else None,
        median_max_logit_after_first_clip=statistics.median(after) if after else None,
        max_post_step_after_first_clip=max(post) if post else None,
        median_post_step_after_first_clip=statistics.median(post) if post else None,
        tokens_per_s=statistics.median(tps) if tps else None,
        elapsed_s=_float(records[-1]["elapsed_s"]) if records[-1].get("elapsed_s") is not None else None,
        smooth=smooth,
        curve_steps=steps,
        curve_loss=loss,
        curve_max_logit=logits,
        val_steps=[s for s, _ in vals],
        val_loss=[v for _, v in vals],
    )


def add_steps_to_target(runs: list[RunSummary], target: float, reference_steps: Optional[int]) -> None:
    """Fill steps_to_target (first logged step with loss <= target) and target_ratio in place."""
    for run in runs:
        run.steps_to_target = next((s for s, v in zip(run.curve_steps, run.curve_loss) if v <= target), None)
        if run.steps_to_target is not None and reference_steps:
            run.target_ratio = run.steps_to_target / reference_steps


def best_per_optimizer(runs: list[RunSummary]) -> list[RunSummary]:
    """The run with the lowest final loss of each optimizer (in first-seen order)."""
    best: dict[str, RunSummary] = {}
    for run in runs:
        cur = best.get(run.optimizer)
        if cur is None or _key(run.final_loss) < _key(cur.final_loss):
            best[run.optimizer] = run
    return list(best.values())


def _key(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf
