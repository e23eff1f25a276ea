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
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from kimi_train.analysis.runs import (RunSummary, add_steps_to_target, best_per_optimizer, expand_run_dirs,
                                      summarise)
from kimi_train.analysis.sweep_plots import plot_all
from kimi_train.errors import UserError


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
        if args.json:
            from kimi_train.fs import writable_dir

            writable_dir(Path(args.json).parent, "--json's directory")
        runs, target = build_report(args.run_dirs, args.smooth, args.steps_to_target_of, args.target_loss,
                                    args.best_per_optimizer)
        plots = plot_all(runs, args.plots, target) if args.plots else []
    except (UserError, ValueError) as e:
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
