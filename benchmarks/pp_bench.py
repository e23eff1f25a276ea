"""Pipeline parallelism on gloo CPU ranks: step time and measured bubble of each layout, against
one process training the same model on the same global batch.

    python benchmarks/pp_bench.py --json docs/results/pp/pp_bench.json   # the documented run (3.5 min, 2 cores)
    python benchmarks/pp_bench.py --smoke --json /tmp/pp.json             # seconds: what the test runs

Layouts, each through the real Trainer (``trainer.train_step()``), every step B * M sequences of
--seq-len tokens in M micro-batches (--microbatches lists the Ms):

    1 process          no PP (the FSDP2 engine on one spawned rank): M accumulation micro-batches of B
    pp2 1F1B           2 ranks, one stage each
    pp2 Interleaved    2 ranks, two stages each (stage s on rank s % 2), Interleaved1F1B
    pp4 1F1B           4 ranks, one stage each
    pp2 x dp_shard2    4 ranks: 2 stages, each FSDP over 2 ranks; M micro-batches of B/2 per data rank

Measured on every rank, for each timed step (--steps, after --warmup; dist.barrier() before each):

    step      wall time of trainer.train_step(): batch, pipeline, grad norm, optimizer, expert bias
    CPU       the process CPU time of that call (all of a rank's threads, gloo's included), summed
              over ranks: the work a step costs, which other load on the machine disturbs less
    schedule  wall time of the engine's schedule.step(): the pipeline part of the step
    busy      wall time inside the torch PipelineStage methods that compute: forward_one_chunk,
              backward_one_chunk, backward_weight_one_chunk (zero-bubble schedules only) and
              perform_reduce_grad (FSDP's gradient reduction and the 1/M scale)
    bubble    (schedule - busy) / schedule: the share of the pipeline a rank spends outside its
              stages' compute, waiting for a neighbour

The JSON also keeps each timed method's time and call count per rank (M forwards and M
backwards per stage: the timers sit where the schedule computes).

A step's time is its slowest rank's, its bubble the mean over ranks; each figure is the median
over the timed steps, then over the rounds (the table shows the rounds' range in brackets). Beside the measured bubble, the textbook one: (p-1)/(M+p-1) for 1F1B and
(p-1)/(v*M+p-1) for Interleaved1F1B with v stages per rank (p: pipeline ranks).

Rounds: every layout once per round (1, 2, then 4 ranks; all Ms in one spawn), --rounds rounds.
The step-time ratio against the 1-process reference is taken within each round, then its median
over rounds, so load from other processes weighs on every layout alike. Every rank runs
torch.set_num_threads(--threads) (1 by default, spawn's default), so 4 ranks share 2 cores.

On CPU the measured idle time also holds gloo's send/recv of the activations and gradients (a
copy through a local socket) and, with more ranks than cores, the time a rank waits for a core;
the busy time includes the latter too. The first step's loss of every layout is recorded: the
same model and the same batch give the same loss (to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (ranks, parallel.* keys). The reference has no pipeline.
LAYOUTS = {
    "1 process": (1, {}),
    "pp2 1F1B": (2, {"pp": 2}),
    "pp2 Interleaved1F1B": (2, {"pp": 2, "pp_schedule": "Interleaved1F1B"}),
    "pp4 1F1B": (4, {"pp": 4}),
    "pp2 x dp_shard2 1F1B": (4, {"pp": 2, "dp_shard": 2}),
}
REFERENCE = "1 process"
# The PipelineStage methods that compute (torch.distributed.pipelining.stage); the schedules call
# them and nothing else computes a stage's forward or backward.
BUSY = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk", "perform_reduce_grad")


# ---------------------------------------------------------------------------- one layout on one rank
def config(args: argparse.Namespace, parallel: dict, world: int, microbatches: int):
    """The run's TrainConfig: B * M sequences per step, micro-batches of B / dp per data rank."""
    from kimi_train.config import (CheckpointConfig, DataConfig, LoggingConfig, OptimConfig, ParallelConfig,
                                   TrainConfig, TrainLoopConfig, validate)  # fmt: skip
    from kimi_train.model import load_model_config

    pp = parallel.get("pp", 1)
    dp = world // pp
    keys = dict(parallel, pp_microbatches=microbatches) if pp > 1 else parallel
    cfg = TrainConfig(
        model=load_model_config(args.model, num_hidden_layers=args.layers),
        optim=OptimConfig(name="muonclip", ns_dtype="fp32", ns_backend="torch"),
        train=TrainLoopConfig(steps=args.warmup + args.steps, seq_len=args.seq_len, micro_batch_size=args.micro_batch // dp,
                              global_batch_size=args.micro_batch * microbatches, dtype="fp32", cpu_threads=args.threads,
                              val_batches=0),
        data=DataConfig(max_bytes=args.data_bytes), parallel=ParallelConfig(**keys), checkpoint=CheckpointConfig(every=0),
        logging=LoggingConfig(wandb="disabled", progress_bar=False, plots=False),
    )  # fmt: skip
    return validate(cfg, dp_size=dp)


def _timed(fn, clock: dict, key: str):
    """fn, adding its wall time to clock[key] and counting its calls in clock["calls"][key]."""
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - t0
            clock["calls"][key] += 1

    return wrapped


def _instrument(schedule: Any, clock: dict) -> int:
    """Time this rank's schedule.step and its stages' compute (instance attributes shadow the
    methods); returns the number of stages on this rank."""
    stages = list(getattr(schedule, "_stages", None) or [schedule._stage])
    for stage in stages:
        for name in BUSY:
            if not hasattr(stage, name):
                raise RuntimeError(f"torch {torch.__version__}: PipelineStage has no {name}; update pp_bench.BUSY")
            setattr(stage, name, _timed(getattr(stage, name), clock, name))
    schedule.step = _timed(schedule.step, clock, "schedule")
    return len(stages)


def measure(trainer: Any, warmup: int, steps: int) -> dict:
    """Per timed step: this rank's step time and, with a pipeline, its schedule time, busy time
    (the sum over BUSY), each BUSY method's time and its calls."""
    import torch.distributed as dist

    schedule = getattr(trainer.engine, "schedule", None)
    clock: dict = {}
    stages = _instrument(schedule, clock) if schedule is not None else 0
    timed, first_loss = [], None
    for i in range(warmup + steps):
        dist.barrier()
        clock.update({key: 0.0 for key in ("schedule", *BUSY)}, calls={key: 0 for key in ("schedule", *BUSY)})
        t0, c0 = time.perf_counter(), time.process_time()
        record = trainer.train_step()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        trainer.step += 1
        first_loss = record["loss"] if first_loss is None else first_loss
        if i < warmup:
            continue
        step = {"step_s": elapsed, "cpu_s": cpu}
        if schedule is not None:
            step.update(schedule_s=clock["schedule"], busy_s=sum(clock[key] for key in BUSY),
                        busy_by_method_s={key: clock[key] for key in BUSY}, calls=dict(clock["calls"]))
        timed.append(step)
    return {"steps": timed, "stages_on_rank": stages, "first_loss": first_loss}


def _rank(rank: int, world: int, args: argparse.Namespace, names: list[str], root: str) -> dict:
    """Every layout of this world size, each M in turn, in this one process group."""
    from kimi_train.loop.trainer import Trainer

    out = {}
    for name in names:
        for m in args.microbatches:
            trainer = Trainer(config(args, LAYOUTS[name][1], world, m), Path(root) / f"{name}-m{m}".replace(" ", "_"))
            out[(name, m)] = measure(trainer, args.warmup, args.steps)
            del trainer
    return out


# ---------------------------------------------------------------------------- the rounds
def textbook_bubble(parallel: dict, m: int) -> float:
    p = parallel.get("pp", 1)
    v = 1 if parallel.get("pp_schedule", "1F1B") == "1F1B" else 2
    return (p - 1) / (v * m + p - 1)


def _summarise(per_rank: list[dict]) -> dict:
    """One round of one layout and M: the slowest rank's step, the ranks' mean bubble (medians over steps)."""
    steps = range(len(per_rank[0]["steps"]))
    row = {"step_s": statistics.median(max(r["steps"][i]["step_s"] for r in per_rank) for i in steps),
           "cpu_s": statistics.median(sum(r["steps"][i]["cpu_s"] for r in per_rank) for i in steps),
           "first_loss": per_rank[0]["first_loss"]}
    if per_rank[0]["stages_on_rank"]:
        bubble = [statistics.mean(1 - r["steps"][i]["busy_s"] / r["steps"][i]["schedule_s"] for r in per_rank)
                  for i in steps]
        row.update(bubble=statistics.median(bubble),
                   schedule_s=statistics.median(max(r["steps"][i]["schedule_s"] for r in per_rank) for i in steps),
                   busy_s_per_rank=[statistics.median(s["busy_s"] for s in r["steps"]) for r in per_rank],
                   busy_by_method_s_per_rank=[{key: statistics.median(s["busy_by_method_s"][key] for s in r["steps"])
                                               for key in BUSY} for r in per_rank],
                   calls_per_rank=[r["steps"][-1]["calls"] for r in per_rank],
                   stages_per_rank=per_rank[0]["stages_on_rank"])
    return row


def _row(name: str, m: int, rounds: list[dict], args: argparse.Namespace) -> dict:
    """One layout and M over the rounds: medians, each round's figure beside them."""
    ranks, parallel = LAYOUTS[name]
    pp = parallel.get("pp", 1)
    per_round = [rd[(name, m)] for rd in rounds]
    row = {"layout": name, "ranks": ranks, "pp": pp, "dp_shard": ranks // pp,
           "schedule": parallel.get("pp_schedule", "1F1B") if pp > 1 else None, "microbatches": m,
           "micro_batch_per_data_rank": args.micro_batch // (ranks // pp), "global_batch": args.micro_batch * m,
           "first_loss": per_round[0]["first_loss"]}
    for key in ("step_s", "cpu_s"):
        row.update({key: statistics.median(x[key] for x in per_round), f"{key}_per_round": [x[key] for x in per_round]})
    if REFERENCE in args.layouts:
        ratios = [x["step_s"] / rd[(REFERENCE, m)]["step_s"] for x, rd in zip(per_round, rounds)]
        row.update(vs_reference=statistics.median(ratios), vs_reference_per_round=ratios)
    if pp == 1:
        return row
    row.update(bubble=statistics.median(x["bubble"] for x in per_round), bubble_per_round=[x["bubble"] for x in per_round],
               textbook_bubble=textbook_bubble(parallel, m), stages_per_rank=per_round[0]["stages_per_rank"],
               schedule_s=statistics.median(x["schedule_s"] for x in per_round),
               busy_s_per_rank=[statistics.median(x["busy_s_per_rank"][k] for x in per_round) for k in range(ranks)],
               busy_by_method_s_per_rank=[{key: statistics.median(x["busy_by_method_s_per_rank"][k][key] for x in per_round)
                                           for key in BUSY} for k in range(ranks)],
               calls_per_rank=per_round[0]["calls_per_rank"])
    return row


def run(args: argparse.Namespace) -> dict:
    """--rounds rounds of every layout (one spawn per world size and round); the rows."""
    from kimi_train.parallel.spawn import spawn

    by_world: dict[int, list[str]] = {}
    for name in args.layouts:
        by_world.setdefault(LAYOUTS[name][0], []).append(name)
    rounds: list[dict] = []
    started = []  # each round's start, seconds since the run's
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pp_bench_") as tmp:
        for r in range(args.rounds):
            started.append(time.perf_counter() - t0)
            this_round = {}
            for world, names in sorted(by_world.items()):
                root = os.path.join(tmp, f"round{r}-world{world}")
                per_rank = spawn(_rank, world, args, names, root, timeout_s=args.timeout, threads=args.threads)
                for key in per_rank[0]:
                    this_round[key] = _summarise([p[key] for p in per_rank])
            rounds.append(this_round)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} M={m} {1e3 * v['step_s']:.0f} ms"
                                                                for (n, m), v in this_round.items()), flush=True)
    return {"round_started_s": started,
            "results": [_row(name, m, rounds, args) for name in args.layouts for m in args.microbatches]}


def _with_range(median: float, per_round: list[float], fmt: str) -> str:
    """'0.64x (0.58-0.70)': the median and, with several rounds, the rounds' range."""
    if len(per_round) < 2:
        return format(median, fmt)
    return f"{median:{fmt}} ({min(per_round):{fmt}}-{max(per_round):{fmt}})"


def table(results: list[dict]) -> str:
    """Medians over the rounds; in brackets the range over the rounds (several rounds only)."""
    lines = ["| layout | ranks | M | step (ms) | step / 1 process's | CPU, all ranks (ms) | schedule (ms) | bubble measured | "
             "bubble textbook | busy per rank (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if "vs_reference" not in r:
            vs = "-"
        elif r["layout"] == REFERENCE:
            vs = "1"
        else:
            vs = _with_range(r["vs_reference"], r["vs_reference_per_round"], ".2f")
        if "bubble" in r:
            schedule, textbook = f"{1e3 * r['schedule_s']:.0f}", f"{r['textbook_bubble']:.2f}"
            bubble = _with_range(r["bubble"], r["bubble_per_round"], ".2f")
            busy = ", ".join(f"{1e3 * b:.0f}" for b in r["busy_s_per_rank"])
        else:
            schedule = bubble = textbook = busy = "-"
        lines.append(f"| {r['layout']} | {r['ranks']} | {r['microbatches']} | {1e3 * r['step_s']:.0f} | {vs} | "
                     f"{1e3 * r['cpu_s']:.0f} | {schedule} | {bubble} | {textbook} | {busy} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="configs/model/NAME.yaml")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (a multiple of 4: pp4, and 2 x 2 stages)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4, help="B: sequences per micro-batch (even: dp_shard=2 halves it)")
    ap.add_argument("--microbatches", default="4,8", help="the Ms: micro-batches per step")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of: {', '.join(LAYOUTS)}")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per layout and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--data-bytes", type=int, default=2_000_000, help="text read from the stdlib source")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a collective may wait (spawn's timeout_s)")
    ap.add_argument("--smoke", action="store_true", help="a tiny, fast run (the test's)")
    ap.add_argument("--json", default=None, help="write every figure and the machine here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.seq_len, args.micro_batch, args.microbatches = 4, 16, 2, "4"
        args.warmup, args.steps, args.rounds, args.data_bytes, args.timeout = 0, 1, 1, 60_000, 60.0
    args.microbatches = [int(m) for m in str(args.microbatches).split(",")]
    args.layouts = args.layouts.split(",")
    for name in args.layouts:
        if name not in LAYOUTS:
            sys.exit(f"--layouts: {name!r} is not one of {', '.join(LAYOUTS)}")
    if args.micro_batch % 2:
        sys.exit(f"--micro-batch={args.micro_batch}: must be even (pp2 x dp_shard2 gives each data rank half)")

    command = "python benchmarks/pp_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    load_before, started_utc = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    t0 = time.perf_counter()
    report = run(args)
    report = {"command": command.strip(),
              "config": {k: getattr(args, k) for k in ("model", "layers", "seq_len", "micro_batch", "microbatches",
                                                        "layouts", "warmup", "steps", "rounds", "threads", "smoke")},
              "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                          "cpu_count": os.cpu_count(), "threads_per_rank": args.threads, "backend": "gloo",
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "started": started_utc,
              "wall_s": time.perf_counter() - t0, **report}
    print(report["command"])
    print(table(report["results"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
