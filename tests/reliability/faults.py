"""The fault-injection suite: each fault injected into real `kimi-train` runs, then the same command rerun.

    python tests/reliability/faults.py --repeat 5 --json docs/results/reliability.json   # the table in docs/reliability.md
    python -m pytest tests/reliability                                                   # each fault once (CI)

Every scenario trains the same toy run (a 2-layer MLA + MoE model, 8 steps of 4 x 32 bytes,
a checkpoint every 2 steps, 1 CPU thread) and compares it with one uninterrupted run of the
same command:

- survived: every process exited with the code the fault calls for (0, 1 for a training
  error, 2 for a user error, 130/143 for a signal), one line on stderr for an error, and the
  rerun of the same command finished the run;
- lost: per-step records of the finished run (every metric but wall-clock ones) that differ
  from the uninterrupted run or are missing, plus checkpoints of the uninterrupted run's last
  step that do not load. Must be 0.

The random step of a fault comes from ``--seed``, so a table can be reproduced. The checkpoint
faults (SIGKILL mid-save, a full disk) are asked for through the environment and happen at the one
hook point every write of a save passes, ``kimi_train.loop.checkpoint.store._fault``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 8, 2
TOY = [
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_attention_heads=2", "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "train.seq_len=32", "train.micro_batch_size=4", f"train.steps={STEPS}", "train.log_every=1",
    "train.val_every=4", "train.val_batches=1", f"checkpoint.every={EVERY}", "checkpoint.keep=3",
    "data.max_bytes=200000", "logging.wandb=disabled", "logging.plots=false", "logging.progress_bar=false",
    "optim.qk_clip.tau=0.5",
]  # fmt: skip
WALL_CLOCK = {"tokens_per_s", "elapsed_s", "mfu"}


@dataclass
class Outcome:
    fault: str
    runs: int = 0
    survived: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KIMI_TRAIN_DEBUG", "WANDB"))}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


def kimi_train(run_dir: Path, *overrides: str, env: dict[str, str] | None = None,
               torchrun: int = 0, extra_torchrun: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
               *extra_torchrun, "-m", "kimi_train.train"]
    else:
        cmd = [sys.executable, "-m", "kimi_train.train"]
    return subprocess.run([*cmd, f"run_dir={run_dir}", *TOY, *overrides], capture_output=True, text=True,
                          env=env or _env(), cwd=tempfile.gettempdir(), timeout=900)


def records(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "step" in r and "loss" in r:
            out[r["step"]] = {k: v for k, v in r.items() if k not in WALL_CLOCK}
    return out


def lost_steps(run_dir: Path, reference: dict[int, dict]) -> int:
    got = records(run_dir)
    return sum(1 for step, ref in reference.items() if got.get(step) != ref)


def one_error_line(proc: subprocess.CompletedProcess) -> bool:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("kimi-train: ")


def finish(run_dir: Path, reference: dict[int, dict], *overrides: str, torchrun: int = 0) -> tuple[bool, int]:
    """Rerun the same command; (it finished, the steps lost)."""
    proc = kimi_train(run_dir, *overrides, torchrun=torchrun)
    ok = proc.returncode == 0 and (run_dir / "summary.json").is_file()
    return ok, lost_steps(run_dir, reference)


# ---------------------------------------------------------------------------- scenarios
# Each takes (a fresh run dir, the reference records, a random generator) and returns
# (survived, lost, note).

def sigkill_at_random_step(run_dir, ref, rng):
    step = rng.randint(2, STEPS)
    proc = kimi_train(run_dir, env=_env(KIMI_TRAIN_DEBUG_KILL_AT=f"0:{step}:KILL"))
    ok, lost = finish(run_dir, ref)
    return proc.returncode == -signal.SIGKILL and ok, lost, f"step {step}"


def sigkill_mid_save(run_dir, ref, rng):
    step = rng.choice(range(EVERY, STEPS, EVERY))
    proc = kimi_train(run_dir, env=_env(KIMI_TRAIN_DEBUG_KILL_IN_SAVE=str(step)))
    ok, lost = finish(run_dir, ref)
    return proc.returncode == -signal.SIGKILL and ok, lost, f"save of step {step}"


def _signal_at_random_step(name: str, code: int):
    def scenario(run_dir, ref, rng):
        step = rng.randint(1, STEPS - 1)
        proc = kimi_train(run_dir, env=_env(KIMI_TRAIN_DEBUG_KILL_AT=f"0:{step}:{name}"))
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
        lines = proc.stderr.strip().splitlines()  # the notice when the signal lands, then the stop
        stopped = (proc.returncode == code and all(line.startswith("kimi-train: ") for line in lines)
                   and lines[-1] == f"kimi-train: stopped at step {step}; run the same command to resume")
        ok, lost = finish(run_dir, ref)
        summary = json.loads((run_dir / "summary.json").read_text()) if ok else {}
        resumed = str(summary.get("resumed_from") or "")
        return stopped and ok and bool(saved) and resumed.endswith(saved[-1]), lost, f"step {step}, saved {saved[-1:]}"
    return scenario


def _damaged_latest(damage: Callable[[Path, random.Random], str]):
    """Stop after step 6 (checkpoints 2, 4, 6), damage a file of step 6, rerun: a warning naming it,
    the resume from step 4, and the finished run equal to the reference."""
    def scenario(run_dir, ref, rng):
        kimi_train(run_dir, env=_env(KIMI_TRAIN_DEBUG_KILL_AT=f"0:{STEPS - 1}:KILL"))
        latest = run_dir / "checkpoints" / f"step_{STEPS - 2:08d}"
        files = sorted(p for p in latest.iterdir() if p.is_file() and p.name != "COMPLETE")
        target = rng.choice(files)
        what = damage(target, rng)
        proc = kimi_train(run_dir)
        warned = latest.name in proc.stderr and target.name in proc.stderr
        summary = json.loads((run_dir / "summary.json").read_text()) if proc.returncode == 0 else {}
        fell_back = str(summary.get("resumed_from") or "").endswith(f"step_{STEPS - 4:08d}")
        return proc.returncode == 0 and warned and fell_back, lost_steps(run_dir, ref), f"{what} {target.name}"
    return scenario


def _truncate(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    os.truncate(path, rng.randrange(0, max(size, 1)))
    return "truncated"


def _flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "bit flipped in"


def full_disk_on_save(run_dir, ref, rng):
    step = rng.choice(range(EVERY, STEPS, EVERY))
    proc = kimi_train(run_dir, env=_env(KIMI_TRAIN_DEBUG_FAIL_IN_SAVE=f"ENOSPC:step_{step:08d}.tmp/*"))
    refused = proc.returncode == 2 and one_error_line(proc) and "No space left" in proc.stderr
    ok, lost = finish(run_dir, ref)
    return refused and ok, lost, f"save of step {step}"


def unwritable_run_dir(run_dir, ref, rng):
    blocker = run_dir.parent / "a_file"
    blocker.write_text("not a directory")
    proc = kimi_train(blocker / "run")
    refused = proc.returncode == 2 and one_error_line(proc) and str(blocker) in proc.stderr
    ok, lost = finish(run_dir, ref)  # the same run in a writable place
    return refused and ok, lost, ""


def changed_config_on_rerun(run_dir, ref, rng):
    first = kimi_train(run_dir)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")}
    proc = kimi_train(run_dir, "optim.lr=0.003")
    after = {name: (run_dir / name).read_bytes() for name in before}
    refused = proc.returncode == 2 and one_error_line(proc) and "optim.lr" in proc.stderr
    return first.returncode == 0 and refused and before == after, lost_steps(run_dir, ref), ""


def killed_rank_under_torchrun(run_dir, ref, rng):
    """torchrun --max-restarts=1, rank 1 SIGKILLed at a random step: the job restarts, resumes, and
    its records equal the one-process run of the same global batch (2 ranks x 2 sequences)."""
    step = rng.randint(2, STEPS)
    proc = kimi_train(run_dir, "train.micro_batch_size=2", torchrun=2, extra_torchrun=("--max-restarts=1",),
                      env=_env(KIMI_TRAIN_DEBUG_KILL_AT=f"1:{step}:KILL", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    return proc.returncode == 0, _lost_approx(run_dir, ref), f"rank 1 at step {step}"


def _lost_approx(run_dir: Path, ref: dict[int, dict], rel: float = 1e-4) -> int:
    """Steps whose loss or max logit differ from the one-process reference by more than ``rel``
    (two ranks sum in another order), or are missing."""
    got = records(run_dir)
    bad = 0
    for step, r in ref.items():
        g = got.get(step)
        if g is None or any(abs(g[k] - r[k]) > rel * abs(r[k]) for k in ("loss", "max_logit")):
            bad += 1
    return bad


SCENARIOS: dict[str, Callable] = {
    "SIGKILL at a random step": sigkill_at_random_step,
    "SIGKILL in the middle of a save": sigkill_mid_save,
    "SIGTERM at a random step": _signal_at_random_step("TERM", 143),
    "SIGINT (Ctrl-C) at a random step": _signal_at_random_step("INT", 130),
    "truncated file in the latest checkpoint": _damaged_latest(_truncate),
    "bit flip in the latest checkpoint": _damaged_latest(_flip),
    "full disk while saving": full_disk_on_save,
    "unwritable run directory": unwritable_run_dir,
    "changed config on rerun of a finished run": changed_config_on_rerun,
    "killed rank under torchrun (--max-restarts=1)": killed_rank_under_torchrun,
}
MULTI_PROCESS = {"killed rank under torchrun (--max-restarts=1)"}


def reference_records(workdir: Path) -> dict[int, dict]:
    ref_dir = workdir / "reference"
    proc = kimi_train(ref_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted reference run failed:\n{proc.stderr[-2000:]}")
    ref = records(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1)), sorted(ref)
    return ref


def run_scenario(name: str, repeat: int, seed: int, workdir: Path, ref: dict[int, dict]) -> Outcome:
    outcome, rng = Outcome(name), random.Random(f"{seed}:{name}")
    for i in range(repeat):
        case = workdir / f"{name.split()[0].lower()}_{abs(hash(name)) % 10_000}_{i}"
        case.mkdir(parents=True)
        survived, lost, note = SCENARIOS[name](case / "run", ref, rng)
        outcome.runs += 1
        outcome.survived += int(survived)
        outcome.lost += lost
        outcome.notes.append(note)
        shutil.rmtree(case, ignore_errors=True)
    return outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="injections per fault (default 3)")
    parser.add_argument("--torchrun-repeat", type=int, default=1, help="injections of the torchrun fault")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the outcomes as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        start = time.time()
        ref = reference_records(workdir)
        single_ref = ref
        outcomes = []
        for name in SCENARIOS:
            repeat = args.torchrun_repeat if name in MULTI_PROCESS else args.repeat
            outcomes.append(run_scenario(name, repeat, args.seed, workdir, single_ref))
            o = outcomes[-1]
            print(f"{o.fault}: {o.survived}/{o.runs} survived, {o.lost} steps lost ({'; '.join(o.notes)})", flush=True)
    print()
    print("| fault | injected | survived | steps lost |")
    print("|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.fault} | {o.runs} | {o.survived} | {o.lost} |")
    print(f"\n{time.time() - start:.0f} s, seed {args.seed}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "steps": STEPS, "checkpoint_every": EVERY,
                                               "outcomes": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    if any(o.survived < o.runs or o.lost for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
