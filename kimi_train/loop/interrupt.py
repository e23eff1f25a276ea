"""Stop on SIGINT / SIGTERM at a step boundary every rank agrees on, so the run can save first.

    with StopOnSignal(device, verbose=is_main) as stop:    # around Trainer.fit's loop
        while ...:
            train_step()
            if stop.requested():     # every rank, every step: one MAX all-reduce of a 1-element flag
                save(); raise stop.interrupted(step)       # kimi_train.errors.Interrupted, exit 128 + signum

The handler only records the signal: the step in progress finishes (a step cut in half would
leave gradients, max-logit records and expert counts half-made). A signal reaches the ranks of
a job at different moments (torchrun forwards it to each worker in turn; SLURM may deliver it
to the workers and to torchrun), so each rank's flag is MAX-reduced once per step and every
rank stops after the same step. The signal numbers are reduced, so with SIGINT on one rank and
SIGTERM on another every rank exits 143.

A second signal in a plain process stops it at once (the checkpoint being written is a .tmp
directory renamed only when complete, so the previous one still loads). A launched rank (RANK
set: torchrun, DeepSpeed's launcher, srun) ignores repeats: one signal often arrives twice there
(Ctrl-C reaches the ranks and the launcher, which forwards it again), and the launcher itself
SIGKILLs its workers after its shutdown timeout.

Exit codes: a rank that got a signal itself exits 128 + signum; a rank that learned of the stop
only from another rank (the other nodes of a multi-node job) exits 0, so its launcher counts a
success and does not restart it. Under torchrun such a node's local rank 0 also stops its own
torchrun (``stop_own_launcher``): a torchrun whose ranks all succeeded would otherwise wait up to
300 s in its exit barrier for the signalled node's torchrun, which the signal ended.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import torch
import torch.distributed as dist

from kimi_train.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager: SIGINT/SIGTERM handlers that set a flag; ``requested()`` agrees on it over ranks.

    The previous handlers are restored on exit. Outside the main thread (where Python cannot
    install handlers) it installs nothing and ``requested()`` is always False.
    """

    def __init__(self, device: torch.device | str = "cpu", verbose: bool = True):
        self.device, self.verbose = torch.device(device), verbose
        self.signum: Optional[int] = None  # the signal the job stops on (MAX over ranks)
        self.received: Optional[int] = None  # the signal this process got itself
        self._previous: dict[int, Any] = {}
        self._repeats_abort = "RANK" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            self.signum = self.signum or signum
            if self.verbose:  # os.write: safe wherever the main thread was interrupted
                again = "; again to stop at once without saving" if self._repeats_abort else ""
                os.write(2, f"kimi-train: {name}: stopping after this step, with a checkpoint{again}\n".encode())
        elif self._repeats_abort:
            raise Interrupted(f"second {name}: stopped at once, without saving; the last complete "
                              "checkpoint loads when you run the same command", 128 + signum)

    def requested(self) -> bool:
        """Whether any rank got a signal; every rank must call it at the same point (a collective)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([self.signum or 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or self.signum
        return self.signum is not None

    def interrupted(self, step: int) -> Interrupted:
        """The exception that ends the run once step ``step`` is saved: exit 130 / 143 where the
        signal arrived, 0 on a rank that only heard of it (its launcher must not restart it)."""
        if self.received is None:
            name = signal.Signals(self.signum).name if self.signum else "a signal"
            return Interrupted(f"stopped at step {step} ({name} on another rank); run the same command to resume", 0)
        return Interrupted(f"stopped at step {step}; run the same command to resume", 128 + self.received)


def stop_own_launcher() -> None:
    """Under torchrun, local rank 0 sends SIGTERM to its torchrun after a stop it heard of from another
    node, once everything is saved; torchrun ends its ranks and exits without a restart."""
    if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("LOCAL_RANK", "0") == "0" and os.getppid() > 1:
        os.kill(os.getppid(), signal.SIGTERM)


def debug_signal_at(rank: int, step: int) -> None:
    """Test hook: KIMI_TRAIN_DEBUG_KILL_AT=<rank>:<step>[:<signal>] sends the signal (default KILL;
    e.g. TERM, INT) to this process when rank <rank> starts step <step> (1-based), in the first
    attempt only (torchrun's TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job runs on."""
    spec = os.environ.get("KIMI_TRAIN_DEBUG_KILL_AT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    at_rank, at_step, *sig = spec.split(":")
    if (int(at_rank), int(at_step)) == (rank, step):
        os.kill(os.getpid(), getattr(signal, "SIG" + (sig[0] if sig else "KILL")))
