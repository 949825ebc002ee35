"""The training state saved in a checkpoint: what it holds, how it is gathered and restored.

Everything needed to continue bit for bit: the four networks, both optimisers, the GradScaler, the step and
images seen, every rank's image pools and random states, the resolved config, the MLflow run id, the world
size and the code version. The learning rate is a function of the step and the data streams a function of
(seed, rank, worker, step), so neither needs more than the counters. Streams are resumed by skipping the
samples already consumed (read, not decoded): exact, at the cost of re-reading them once.
"""

from __future__ import annotations

import logging
import random
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.checkpoint import FORMAT, CheckpointError
from pipeline.config import to_yaml
from pipeline.image_pool import ImagePool

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code (with '-dirty' for local changes), or 'unknown' outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rank_state(pool_a: ImagePool, pool_b: ImagePool, device: torch.device) -> dict[str, Any]:
    """What differs between ranks: image pools and random states."""
    return {"pool_a": pool_a.state_dict(), "pool_b": pool_b.state_dict(), "rng": rng_state(device)}


def build_state(
    *,
    step: int,
    images_seen: int,
    nets: dict[str, torch.nn.Module],
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rank_states: list[dict[str, Any]],
    cfg: DictConfig,
    run_id: str | None,
    nonfinite_steps: int = 0,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": step,
        "images_seen": images_seen,
        "nonfinite_steps": nonfinite_steps,
        "nets": {name: net.state_dict() for name, net in nets.items()},
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "scaler": scaler.state_dict(),
        "ranks": rank_states,
        "world_size": len(rank_states),
        "config": to_yaml(cfg),
        "model": OmegaConf.to_container(cfg.model),
        "mlflow_run_id": run_id or "",
        "code_version": code_version(),
    }


def check_compatible(state: dict[str, Any], cfg: DictConfig, source: str) -> None:
    """Raise CheckpointError naming every model setting in which the checkpoint differs from `cfg`."""
    saved = state.get("model", {})
    wanted = OmegaConf.to_container(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    # Initialisation does not shape the networks: a different init is not a mismatch for a resume.
    diffs = [d for d in diffs if not d.startswith(("model.init_type", "model.init_gain"))]
    if diffs:
        raise CheckpointError(
            f"checkpoint '{source}' was trained with another architecture: " + "; ".join(diffs)
            + ". Resume with the checkpoint's model settings, or start a new run_dir"
        )


def restore_rank(
    state: dict[str, Any], rank: int, world_size: int, pool_a: ImagePool, pool_b: ImagePool, device: torch.device
) -> None:
    """Restore this rank's pools and random states; on a world-size change pools are redistributed or refilled."""
    saved = state["ranks"]
    if len(saved) != world_size:
        log.warning(
            "checkpoint was written by %d ranks, this run has %d: image pools of ranks >= %d start empty "
            "and random states are re-seeded, so the run continues but not bit for bit",
            len(saved), world_size, len(saved),
        )
    if rank < len(saved):
        pool_a.load_state_dict(saved[rank]["pool_a"], device)
        pool_b.load_state_dict(saved[rank]["pool_b"], device)
        if len(saved) == world_size:
            set_rng_state(saved[rank]["rng"], device)
