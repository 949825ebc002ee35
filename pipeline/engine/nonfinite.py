"""The run's policy for steps whose loss is NaN or inf: skip the update, count, and stop after too many in a row."""

from __future__ import annotations

import logging

from torch import Tensor

log = logging.getLogger("pipeline.train")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN or inf loss."""


class NonFiniteGuard:
    """Counts skipped steps in a row and raises after `limit` of them (the run's total is a training-state
    counter, kept in checkpoints).

    Every rank sees the same verdict for a step (the step agrees on it across ranks), so they all raise together.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0
        if limit == 0:
            log.warning("control.max_nonfinite_steps=0: losses are not checked for NaN/inf, and a non-finite loss is "
                        "applied to the weights (set it to 1 or more to skip such steps and stop after that many)")

    def record(self, step: int, applied: bool, losses: dict[str, Tensor]) -> None:
        if applied:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        log.warning("step %d: non-finite loss (%s); update skipped (%d in a row)", step,
                    ", ".join(f"{k}={v.item():.3g}" for k, v in losses.items()), self.in_a_row)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} consecutive steps had a NaN/inf loss (last at step {step}); the last checkpoint "
                "holds finite weights. Lower optim.lr, try train.precision=fp32, or check the data for broken images"
            )
