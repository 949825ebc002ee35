"""What the benchmark scripts share: running a child command that does not outlive them, and writing their JSON.

Imported as `_report` by scripts run as `python benchmarks/<script>.py` (their folder is first on sys.path), or as
`benchmarks._report` with the repository root on the path.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Resolved here, in the parent: the child between fork and exec should call, not load, anything.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _die_with(parent: int) -> Callable[[], None]:
    def arm() -> None:
        """In the child, before exec: the kernel sends it SIGKILL when the thread that started it ends, also by
        SIGKILL (a test's timeout), which no handler or `finally` in the benchmark would see. A parent that died
        before the signal was armed is seen as a changed parent id."""
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return arm


def run_child(cmd: list[str], cwd: Path | None = None, timeout: float | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` to its end, capturing its text output, so that it and the processes it starts end with it.

    The child leads a process group of its own, which its data-loader workers and compile workers join; the
    group is killed when the child returns, and on a timeout, Ctrl-C or any other exception here before the
    exception goes on (a TimeoutExpired carries the output so far). On Linux the child is also killed by the
    kernel when this process (the thread that called run_child: call it from the main thread) dies, even by
    SIGKILL; its own children are then left to their own watchdogs (torch's loader workers check their parent).
    Elsewhere only the group kill holds.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with(os.getpid()) if _prctl else None)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            exc.stdout, exc.stderr = out, err
        raise
    _kill_group(proc.pid)  # Whatever it left behind (it has exited, and its output is read).
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the benchmark's figures (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
