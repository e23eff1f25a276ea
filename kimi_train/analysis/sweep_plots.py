"""Plots across runs for the experiments (kimi-train-plot draws one figure per metric; these compare runs).

    stability.png    max attention logit per step (max over layers, log scale) for every run,
                     tau dashed for MuonClip runs | training loss beside it
                     (when no optimizer has runs at two learning rates: a few arms to overlay)
    lr_sweep.png     final loss vs lr | peak max logit vs lr, one line per optimizer
                     (instead, when some optimizer has runs at two or more learning rates)
    best_curves.png  the lowest-final-loss run of each optimizer, loss vs step, with the target loss
                     and the step each reaches it (only with a target: --steps-to-target-of / --target-loss)

Written by `kimi-train-report RUN_DIR ... --plots DIR`.
Figures are small PNGs (about 50 KB) so they can live in docs/results/.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kimi_train.analysis.runs import RunSummary, best_per_optimizer  # noqa: E402

# One colour per optimizer, so the same optimizer reads the same in every figure.
OPTIM_COLORS = {"adamw": "tab:blue", "muon": "tab:red", "muonclip": "tab:green"}
# Muon and MuonClip curves coincide until the first clip: draw Muon wide, MuonClip dashed on top.
OPTIM_STYLES = {"muon": dict(lw=2.4, alpha=0.7), "muonclip": dict(ls="--")}
DPI = 90


def _color(run: RunSummary, i: int) -> str:
    return OPTIM_COLORS.get(run.optimizer, plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10])


def _style(run: RunSummary) -> dict:
    return dict(OPTIM_STYLES.get(run.optimizer, {}))


def _loss_title(runs: list[RunSummary], what: str) -> str:
    n = runs[0].smooth if runs else 1
    return what + (f" (mean of the last {n} steps)" if n > 1 else "")


def _label(run: RunSummary) -> str:
    parts = [run.optimizer]
    if run.lr is not None:
        parts.append(f"lr={run.lr:g}")
    if run.tau is not None:
        parts.append(f"tau={run.tau:g}")
    return " ".join(parts)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_stability(runs: list[RunSummary], path: str | Path) -> Path:
    """Max logit per step (log y, tau dashed) beside the loss curves, every run overlaid."""
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    taus_drawn = set()
    for i, run in enumerate(runs):
        c = _color(run, i)
        pts = [(s, v) for s, v in zip(run.curve_steps, run.curve_max_logit) if math.isfinite(v) and v > 0]
        if pts:
            ax_l.plot(*zip(*pts), color=c, label=_label(run), **{"lw": 1.3, **_style(run)})
        if run.tau is not None and run.tau not in taus_drawn:  # one line per distinct tau
            taus_drawn.add(run.tau)
            ax_l.axhline(run.tau, color="k", ls=":", lw=1, zorder=1, label=f"tau = {run.tau:g}")  # under the curves
        ax_r.plot(run.curve_steps, run.curve_loss, color=c, label=f"{_label(run)} train", **{"lw": 1.1, **_style(run)})
        if run.val_steps:
            ax_r.plot(run.val_steps, run.val_loss, "o", color=c, ms=4, label=f"{_label(run)} val")
    ax_l.set_yscale("log")
    ax_l.set_title("max attention logit (max over layers and heads)")
    ax_r.set_title(_loss_title(runs, "loss (nats/token)"))
    for ax in (ax_l, ax_r):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    finite = [v for r in runs for v in [*r.curve_loss[len(r.curve_loss) // 10:], *r.val_loss] if math.isfinite(v)]
    if finite:  # the first steps (loss ~ ln V) would squash the interesting part
        lo, hi = min(finite), max(finite)
        ax_r.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    return _save(fig, Path(path))


def plot_lr_sweep(runs: list[RunSummary], path: str | Path) -> Path:
    """Final loss vs lr and peak max logit vs lr, one line per optimizer (log lr axis)."""
    by_opt: dict[str, list[RunSummary]] = defaultdict(list)
    for r in runs:
        if r.lr is not None:
            by_opt[r.optimizer].append(r)
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(11, 4))
    taus = set()
    for i, (opt, rs) in enumerate(by_opt.items()):
        rs = sorted(rs, key=lambda r: r.lr)
        c = OPTIM_COLORS.get(opt, f"C{i}")
        lrs = [r.lr for r in rs]
        # a diverged run (non-finite loss) is drawn at the top edge as an x
        losses = [r.final_loss if math.isfinite(r.final_loss) else math.nan for r in rs]
        ax_l.plot(lrs, losses, marker="o", color=c, label=opt, **OPTIM_STYLES.get(opt, {}))
        top = max((v for v in losses if math.isfinite(v)), default=1.0)
        for lr, v in zip(lrs, losses):
            if not math.isfinite(v):
                ax_l.plot([lr], [top], "x", color=c, ms=9)
        peaks = [r.peak_max_logit if r.peak_max_logit is not None else math.nan for r in rs]
        ax_r.plot(lrs, peaks, marker="o", color=c, label=opt, **OPTIM_STYLES.get(opt, {}))
        taus.update(r.tau for r in rs if r.tau is not None)
    for tau in sorted(taus):
        ax_r.axhline(tau, color=OPTIM_COLORS["muonclip"], ls="--", lw=1, label=f"tau = {tau:g}")
    ax_l.set_title(_loss_title(runs, "final training loss vs lr"))
    ax_r.set_title("peak max attention logit vs learning rate")
    ax_r.set_yscale("log")
    for ax in (ax_l, ax_r):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_best_curves(runs: list[RunSummary], path: str | Path, target: Optional[float]) -> Path:
    """The best-lr run of each optimizer (loss vs step), the target loss and where each reaches it."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    best = best_per_optimizer(runs)
    for i, run in enumerate(best):
        c = _color(run, i)
        ax.plot(run.curve_steps, run.curve_loss, color=c, label=_label(run), **{"lw": 1.2, **_style(run)})
        if run.steps_to_target is not None:
            ax.axvline(run.steps_to_target, color=c, ls=":", lw=1)
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.3f}")
    finite = [v for r in best for v in r.curve_loss[len(r.curve_loss) // 10:] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax.set_title(_loss_title(runs, "best lr of each optimizer: training loss"))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_all(runs: list[RunSummary], out_dir: str | Path, target: Optional[float] = None) -> list[Path]:
    """Every figure that applies to these runs (see the module docstring); returns their paths."""
    if not runs:
        raise ValueError("no runs to plot")
    from kimi_train.fs import writable_dir

    out = writable_dir(out_dir, "--plots")
    lrs_per_opt = defaultdict(set)
    for r in runs:
        if r.lr is not None:
            lrs_per_opt[r.optimizer].add(r.lr)
    if any(len(v) >= 2 for v in lrs_per_opt.values()):
        paths = [plot_lr_sweep(runs, out / "lr_sweep.png")]
    else:  # a few arms: overlay every curve
        paths = [plot_stability(runs, out / "stability.png")]
    if target is not None:
        paths.append(plot_best_curves(runs, out / "best_curves.png", target))
    return paths
