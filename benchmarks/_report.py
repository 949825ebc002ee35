"""What the benchmark scripts share: running a child command that cannot outlive them, and writing their JSON.

Imported as `_report` by scripts run as `python benchmarks/<script>.py` (their folder is first on sys.path).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL when the benchmark process ends, even by SIGKILL
    (a test's timeout), which no handler or `finally` in the benchmark would see."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run_child(cmd: list[str], cwd: Path | None = None, timeout: float | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` to its end, capturing text output, so that neither it nor anything it starts outlives us.

    The child leads a process group of its own (its data-loader workers join it) and dies with this process.
    On a timeout, Ctrl-C or any other exception here the whole group is killed before the exception goes on.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the benchmark's figures (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
