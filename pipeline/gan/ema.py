"""An exponential moving average of both generators' weights (Karras et al.'s generator EMA).

The average is taken of the weights every rank holds after the same update, so it is the same on every rank
without any communication. It starts, at `start_step`, as a copy of the weights; buffers (batch norm's running
statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from pipeline.gan.cyclegan import Generators


class GeneratorEMA:
    """`gens`: the averaged generators (eval mode, no gradients), updated by `update(step)` after each step."""

    def __init__(self, source: Generators, decay: float, start_step: int = 0, every: int = 1,
                 names: tuple[str, ...] = ("G_ab", "G_ba")) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.source, self.decay, self.start_step, self.every = source, decay, start_step, max(1, every)
        self.names = names  # The translating networks of `source` (checkpointed under these names).
        self.gens: Generators = copy.deepcopy(source).eval().requires_grad_(False)
        self.started = False
        # Parameters and buffers are updated in place (optimiser steps, load_state_dict): list them once.
        self._averaged = [p.detach() for p in self.gens.parameters()]
        self._current = [p.detach() for p in self.source.parameters()]
        self._buffers = list(zip(self.gens.buffers(), self.source.buffers()))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimiser step `step` (1-based): start (a copy) at `start_step`, then average every `every`."""
        if step < self.start_step:
            return
        if not self.started:
            torch._foreach_copy_(self._averaged, self._current)
            self.started = True
        elif (step - self.start_step) % self.every == 0:
            # One fused pass over all parameters: ema += (1 - decay) * (weights - ema).
            torch._foreach_lerp_(self._averaged, self._current, 1.0 - self.decay)
        else:
            return
        for mine, theirs in self._buffers:
            mine.copy_(theirs)

    def nets(self) -> dict[str, nn.Module]:
        return {name: getattr(self.gens, name) for name in self.names}

    def state_dict(self) -> dict[str, Any]:
        return {"started": self.started, "decay": self.decay, "start_step": self.start_step, "every": self.every,
                "nets": {name: net.state_dict() for name, net in self.nets().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.started = bool(state["started"])
        for name, net in self.nets().items():
            net.load_state_dict(state["nets"][name])
