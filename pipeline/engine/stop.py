"""Stop requests from signals, honoured at a step boundary that every rank agrees on.

SIGTERM (Slurm preemption, torchrun shutting down), SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (Slurm's warning
before the time limit, as `--signal`) only set a flag here. The training step carries the flag through its one
per-step collective, so all ranks stop after the same step, write one checkpoint together and exit with
EXIT_STOPPED. A second SIGINT while stopping exits at once (the checkpoint of the last interval stays).
"""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
EXIT_STOPPED = 3
"""Exit code of a standalone run stopped by a signal (or control.stop_after_steps) after writing its
checkpoint: run the same command to continue. Under torchrun, workers exit 0 instead (torchrun would treat
3 as a crash)."""


class StopFlag:
    """Set by the first stop signal; installed on every rank."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            sys.exit(130)
        if self.signal is None:
            log.warning("received %s: finishing this step, then writing a checkpoint and exiting",
                        signal.Signals(signum).name)
        self.signal = signum

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
