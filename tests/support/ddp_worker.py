"""Run under torchrun by tests/test_distributed.py: the production step on fixed per-rank batches.

After every step all ranks' parameters are gathered and must be equal; rank 0 saves the parameter history and
the first step's (averaged) gradients for the test to compare against a single-process reference.
Usage: torchrun ... tests/support/ddp_worker.py OUT STEPS DTYPE [key=value ...]
TEST_FAIL_AT=RANK:STEP makes that rank raise before that step (a rank that dies mid-run).
"""

from __future__ import annotations

import os
import sys

import torch

from pipeline.config import load_config
from pipeline.data.moments import PixelMoments
from pipeline.engine import dist
from pipeline.train.build import build_components

SIZE = 32


def fixed_batch(rank: int, step: int, dtype: torch.dtype, batch: int = 1,
                channels: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    real_a = torch.rand(batch, channels[0], SIZE, SIZE, generator=g, dtype=torch.float64) * 2 - 1
    real_b = torch.rand(batch, channels[1], SIZE, SIZE, generator=g, dtype=torch.float64) * 2 - 1
    return real_a.to(dtype), real_b.to(dtype)


def fixed_moments() -> dict[str, PixelMoments]:
    """Pixel moments of two domains that differ in colour, for model.colour_start=transfer (a run reads them from
    its shards; here every rank, and the single-process reference, gets these)."""
    mix = torch.tensor([[0.2, 0.05, 0.0], [0.03, 0.15, 0.02], [0.0, 0.04, 0.25]], dtype=torch.float64)
    return {"A": PixelMoments(torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64), mix @ mix.T, 1, 1),
            "B": PixelMoments(torch.tensor([-0.1, 0.1, 0.2], dtype=torch.float64), mix.T @ mix * 1.5, 1, 1)}


def flat_params(components) -> torch.Tensor:
    """All parameters of the four networks, and of the generators' average when there is one."""
    nets = list(components.nets.values()) + ([components.ema.gens] if components.ema is not None else [])
    return torch.cat([p.detach().reshape(-1) for net in nets for p in net.parameters()])


def main(out: str, steps: int, dtype_name: str, overrides: list[str]) -> None:
    dtype = getattr(torch, dtype_name)
    torch.set_default_dtype(dtype)
    info = dist.read_env()
    device = torch.device("cpu")
    dist.init_process_group(info, device)
    cfg = load_config([], overrides)
    parts = build_components(cfg, info, device, fixed_moments() if cfg.model.colour_start == "transfer" else None)
    history, grads = [], {}
    fail_rank, fail_step = (int(x) for x in os.environ.get("TEST_FAIL_AT", "-1:-1").split(":"))
    for step in range(steps):
        if (info.rank, step) == (fail_rank, fail_step):
            raise RuntimeError(f"injected failure on rank {info.rank} at step {step}")
        real_a, real_b = fixed_batch(info.rank, step, dtype, channels=(cfg.model.channels_a, cfg.model.channels_b))
        result = parts.step(real_a, real_b)
        assert result.applied and not result.stop
        if parts.ema is not None:
            parts.ema.update(step + 1)
        flat = flat_params(parts)
        gathered = dist.gather_objects(flat)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, flat):
                raise SystemExit(f"rank {rank} parameters differ from rank {info.rank}'s after step {step + 1}")
        if step == 0:
            grads = {f"{name}.{k}": p.grad.clone() for name, net in parts.nets.items()
                     for k, p in net.named_parameters() if p.grad is not None}
        history.append(flat)
    if info.is_main:
        torch.save({"params": history, "grads": grads, "world_size": info.world_size}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:])
