"""`kimi-train-report RUN_DIR [RUN_DIR ...]`: a markdown table summarising training runs.

Reads each run's metrics.jsonl (one record per logged step, written by the trainer) and
config.yaml (the resolved config). A RUN_DIR that has no metrics.jsonl but whose
subdirectories do (a Hydra multirun sweep directory) stands for all of them.

Columns: optimizer, lr, tau (MuonClip only), steps, final and best training loss, final
validation loss, peak max attention logit, heads clipped, tokens/s, wall time. With
``--steps-to-target-of REF`` (or ``--target-loss X``) two more: the first step at which
each run's training loss reaches the target, and that step divided by REF's step count.

Training loss is one mini-batch per step, so it is noisy; ``--smooth N`` replaces it by
the mean of the last N logged records everywhere it is used (final loss, best loss,
the target and steps-to-target):

    smooth(i) = mean(loss[max(0, i - N + 1)], ..., loss[i])     i = logged record index

    target    = smooth(last record of REF)      (or --target-loss)
    steps_to  = step of the first record with smooth(i) <= target     (None: never reached)
    ratio     = steps_to / steps(REF)

"max logit after 1st clip" is the largest per-step max logit logged after the step of the
first clip (each step's logit is measured in its forward pass, before that step's clip).
"heads clipped" sums the per-step count of heads QK-Clip rescaled over the logged
records, so it is the exact total only with train.log_every=1. Tokens/s is the median
over logged intervals, leaving out the first (which includes start-up); "time" is the
last record's elapsed_s (wall time of the last session, evaluation included). Non-finite
values are written as "inf"/"nan" by the trainer and read back as floats.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from kimi_train.plots import read_metrics


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


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return format(value, spec)
    return str(value)


def _max_median(top: Optional[float], median: Optional[float], tau: Optional[float]) -> str:
    """'36.3 (1.21 tau; median 1.08 tau)', or '-'."""
    out = _fmt(top, ".1f")
    if top is not None and tau:
        out += f" ({top / tau:.2f} tau; median {median / tau:.2f} tau)"
    return out


def markdown_table(runs: list[RunSummary], smooth: int = 1) -> str:
    """The runs as one GitHub-flavoured markdown table."""
    with_target = any(r.steps_to_target is not None or r.target_ratio is not None for r in runs)
    with_clip = any(r.tau is not None for r in runs)
    with_post = any(r.max_post_step_after_first_clip is not None for r in runs)
    loss_note = f" (mean of {smooth})" if smooth > 1 else ""
    header = ["run", "optimizer", "lr", "tau", "steps", f"final loss{loss_note}", "best loss", "final val loss",
              "peak max logit"]
    if with_clip:
        header += ["heads clipped", "max logit after 1st clip"]
    if with_post:
        header += ["post-step max logit after 1st clip: max (median)"]
    header += ["tokens/s", "time (s)"]
    if with_target:
        header += ["steps to target", "x ref steps"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in runs:
        row = [r.label, r.optimizer, _fmt(r.lr, "g"), _fmt(r.tau, "g"), str(r.steps), _fmt(r.final_loss),
               _fmt(r.best_loss), _fmt(r.final_val_loss), _fmt(r.peak_max_logit, ".1f")]
        if with_clip:
            after = _fmt(r.max_logit_after_first_clip, ".1f")
            if r.max_logit_after_first_clip is not None and r.tau:
                after += f" ({r.max_logit_after_first_clip / r.tau:.2f} tau)"
            row += [str(r.heads_clipped) if r.tau is not None else "-", after]
        if with_post:
            row.append(_max_median(r.max_post_step_after_first_clip, r.median_post_step_after_first_clip, r.tau))
        row += [_fmt(r.tokens_per_s, ".0f"), _fmt(r.elapsed_s, ".0f")]
        if with_target:
            row += [_fmt(r.steps_to_target) if r.steps_to_target is not None else "not reached",
                    _fmt(r.target_ratio, ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_report(run_dirs: list[str | Path], smooth: int = 1, steps_to_target_of: Optional[str | Path] = None,
                 target_loss: Optional[float] = None, best_only: bool = False) -> tuple[list[RunSummary], Optional[float]]:
    """Summaries of every run (expanded from sweep directories) and the target loss used, if any."""
    if steps_to_target_of is not None and target_loss is not None:
        raise ValueError("pass either --steps-to-target-of or --target-loss, not both")
    runs = [summarise(d, smooth) for d in expand_run_dirs(run_dirs)]
    target, ref_steps = target_loss, None
    if steps_to_target_of is not None:
        ref_dirs = expand_run_dirs([steps_to_target_of])
        if len(ref_dirs) != 1:
            raise ValueError(f"--steps-to-target-of {steps_to_target_of} holds {len(ref_dirs)} runs; pass one run directory")
        ref = summarise(ref_dirs[0], smooth)
        target, ref_steps = ref.final_loss, ref.steps
    if target is not None:
        if not math.isfinite(target):
            raise ValueError(f"target loss {target} is not finite; pick a reference run that finished")
        add_steps_to_target(runs, target, ref_steps)
    if best_only:
        runs = best_per_optimizer(runs)
    return runs, target


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="kimi-train-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories, or multirun sweep directories")
    parser.add_argument("--smooth", type=int, default=1, help="mean over the last N logged losses (default 1)")
    parser.add_argument("--steps-to-target-of", metavar="RUN_DIR", default=None,
                        help="target = this run's final loss; adds steps-to-target and the ratio to its steps")
    parser.add_argument("--target-loss", type=float, default=None, help="an explicit target loss instead")
    parser.add_argument("--best-per-optimizer", action="store_true",
                        help="one row per optimizer: its run with the lowest final loss")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows as JSON")
    parser.add_argument("--plots", metavar="DIR", default=None,
                        help="also write comparison plots (stability.png, lr_sweep.png, best_curves.png) into DIR")
    args = parser.parse_args(argv)
    try:
        runs, target = build_report(args.run_dirs, args.smooth, args.steps_to_target_of, args.target_loss,
                                    args.best_per_optimizer)
        plots = []
        if args.plots:
            from kimi_train.sweep_plots import plot_all

            plots = plot_all(runs, args.plots, target)
    except ValueError as e:
        print(f"kimi-train-report: {e}", file=sys.stderr)
        sys.exit(2)
    if target is not None:
        print(f"target loss: {target:.4f}" + (f" (final loss of {args.steps_to_target_of})"
                                              if args.steps_to_target_of else ""))
        print()
    print(markdown_table(runs, args.smooth))
    if args.json:
        rows = [{k: v for k, v in asdict(r).items() if not k.startswith(("curve_", "val_steps", "val_loss", "smooth"))}
                for r in runs]
        Path(args.json).write_text(json.dumps({"target_loss": target, "smooth": args.smooth, "runs": rows},
                                              indent=2, default=str) + "\n")
    for p in plots:
        print(p, file=sys.stderr)


if __name__ == "__main__":
    main()
