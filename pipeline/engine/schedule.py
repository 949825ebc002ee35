"""When periodic work happens: every N steps and at the last step, the one rule the loop's components share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """True at every multiple of `steps` and at `last`; `steps=0` means only at `last`; `enabled=False` never."""

    steps: int
    last: int
    enabled: bool = True

    def __call__(self, step: int) -> bool:
        return self.enabled and ((self.steps > 0 and step % self.steps == 0) or step == self.last)
