"""Training metrics between logs: loss sums kept on the device, and peak memory.
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline.engine import dist

log = logging.getLogger("pipeline.train")


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory (allocator statistics: no device sync), else the host's peak RSS."""
    if device.type == "cuda":
        return {"perf/peak_gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"perf/peak_host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricMeter:
    """Sums loss tensors on the device between logs, so ordinary steps never wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.data_s = 0.0
        self.t0 = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], data_s: float) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, torch.zeros((), device=self.device)) + value.float()
        self.steps += 1
        self.data_s += data_s

    def collect(self) -> dict[str, float]:
        """Loss means over the interval and over ranks (a collective: every rank calls it), then reset."""
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / max(self.steps, 1) if keys else torch.zeros(0)
        means = dist.all_reduce_mean(means.to(self.device)).tolist()
        elapsed = time.perf_counter() - self.t0
        out = {f"loss/{k}": v for k, v in zip(keys, means)}
        out["perf/data_wait_share"] = self.data_s / max(elapsed, 1e-9)
        out["perf/steps_per_s"] = self.steps / max(elapsed, 1e-9)
        self.sums, self.steps, self.data_s, self.t0 = {}, 0, 0.0, time.perf_counter()
        return out
