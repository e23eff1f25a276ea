"""A port for a launcher that must be told one in advance (DeepSpeed's launcher: MASTER_PORT).

The rest of the suite picks no port: spawned ranks meet through a FileStore (kimi_train.parallel.spawn)
and `torchrun --standalone` binds its own. A port found free here can be taken by another process
before the launcher binds it, so ``run_with_free_port`` launches again, on a new port, when that is
what failed (tests/ is on sys.path through its conftest.py).
"""

from __future__ import annotations

import socket
import subprocess
from typing import Callable

PORT_TAKEN = ("EADDRINUSE", "Address already in use")  # torch's TCPStore server, Python's socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_with_free_port(launch: Callable[[int], subprocess.CompletedProcess], tries: int = 3) -> subprocess.CompletedProcess:
    """``launch(port)``, again on a new port (``tries`` launches at most) while it fails because the port was taken."""
    for _ in range(tries):
        proc = launch(free_port())
        if proc.returncode == 0 or not any(m in (proc.stdout or "") + (proc.stderr or "") for m in PORT_TAKEN):
            return proc
    return proc
