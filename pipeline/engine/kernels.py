"""Process-wide kernel settings of a rank, from the config's `perf` group: threads, denormals, cudnn, TF32 and
deterministic algorithms. Set once, before the networks run."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# cuBLAS is deterministic only with a fixed workspace; the variable must be set before its first handle exists.
_CUBLAS_WORKSPACE = ":4096:8"


def configure_kernels(perf: Any, device: torch.device) -> None:
    """Apply `perf.threads`, `perf.tf32` and `perf.deterministic` for `device` (torch-global choices)."""
    if perf.threads:
        torch.set_num_threads(perf.threads)
    if perf.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True)
        log.info("perf.deterministic: deterministic kernels only%s", ", cudnn autotuning off (slower)"
                 if device.type == "cuda" else "")
    if device.type == "cpu":
        # Denormal activations appear after a few hundred GAN steps and make x86 CPUs up to 6x slower.
        torch.set_flush_denormal(True)
        return
    torch.backends.cuda.matmul.allow_tf32 = perf.tf32
    torch.backends.cudnn.allow_tf32 = perf.tf32
    torch.backends.cudnn.deterministic = perf.deterministic
    # Fixed crop sizes: pick the fastest convolution once (timing picks differ between runs: not deterministic).
    torch.backends.cudnn.benchmark = not perf.deterministic
