"""The training state saved in a checkpoint: what it holds, how each rank contributes and restores it.

Everything needed to continue bit for bit: the four networks, both optimisers, the GradScaler and the EMA
(replicated: equal on every rank, written once), the step and images seen, each rank's image pools and random
states and where its data streams stand (written by that rank), the resolved config, the MLflow run id, the world size
and the code version. The learning rate is a function of the step. The streams' state (pipeline.data.stream_state)
names the samples by position, so a resume reads only the samples the shuffle buffers held and the rest of the
shards being read, however long the run has been.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ModelConfig, to_yaml
from pipeline.engine.checkpoint import SHARDED_FORMAT, CheckpointError
from pipeline.engine.version import code_version
from pipeline.gan.stepping import Optimisers, Pools

log = logging.getLogger(__name__)


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


class TrainingState:
    """Everything a checkpoint holds about training, as one object: the counters (step, images seen, skipped
    non-finite steps), the four networks, both optimisers and the GradScaler, and this rank's pools and random
    states. `header()`, `shared_state()` and `rank_state()` are what a checkpoint writes, `load_state_dict()` what
    a resume restores."""

    def __init__(self, nets: dict[str, torch.nn.Module], optimisers: Optimisers, pools: Pools,
                 device: torch.device, ema: Any = None, sampling: Any = None,
                 streams: Callable[[], dict[str, Any]] | None = None, health: Any = None) -> None:
        self.nets, self.optimisers, self.pools, self.device = nets, optimisers, pools, device
        self.health = health  # The training-health monitor's history (pipeline.train.health), if any.
        self.streams = streams  # This rank's data streams' state, where they have one (`saved_streams`).
        self.sampling = sampling  # CUT's per-rank draws (flips, patch positions), else None.
        self.ema = ema
        self.step = 0
        self.images_seen = 0
        self.nonfinite_steps = 0

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks: image pools, random states and data streams (each rank writes its own)."""
        state = {"pool_a": self.pools.a.state_dict(), "pool_b": self.pools.b.state_dict(),
                 "rng": rng_state(self.device)}
        if self.sampling is not None:
            state["sampling"] = self.sampling.state_dict()
        if self.streams is not None:
            state["stream"] = self.streams()
        return state

    def shared_state(self, buffers: bool = True) -> dict[str, Any]:
        """What every rank holds alike: networks, optimisers, scaler and EMA (written once across the ranks).

        Args:
            buffers: include the networks' buffers (batch norm's running statistics). They differ between ranks
                between DDP's broadcasts, which spread rank 0's before each forward pass: only rank 0's are the
                run's, so only rank 0 passes them to a checkpoint.
        """
        state = {
            "nets": {name: _weights(net, buffers) for name, net in self.nets.items()},
            "opt_g": self.optimisers.g.state_dict(),
            "opt_d": self.optimisers.d.state_dict(),
            "scaler": self.optimisers.scaler.state_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
            if not buffers:
                state["ema"]["nets"] = {name: _weights(net, False) for name, net in self.ema.nets().items()}
        return state

    def header(self, cfg: DictConfig, run_id: str | None, world_size: int) -> dict[str, Any]:
        """Counters, config and provenance: plain values, read first on resume and by every command."""
        return {
            "format": SHARDED_FORMAT,
            "step": self.step,
            "images_seen": self.images_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "health": self.health.state_dict() if self.health is not None else None,
            "world_size": world_size,
            "config": to_yaml(cfg),
            "model": OmegaConf.to_container(cfg.model),
            "mlflow_run_id": run_id or "",
            "code_version": code_version(),
        }

    def load_state_dict(self, state: dict[str, Any], rank: int, world_size: int) -> None:
        """Restore a checkpoint's state on this rank (`state["ranks"]` holds at least this rank's entry, where
        the checkpoint has one). On a world-size change rank r takes the pools of the old rank r where there was
        one, else starts with empty pools; random states are then re-seeded, not restored."""
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
        self.optimisers.g.load_state_dict(state["opt_g"])
        self.optimisers.d.load_state_dict(state["opt_d"])
        self.optimisers.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" in state:
                self.ema.load_state_dict(state["ema"])
            else:
                log.warning("the checkpoint has no generator EMA (trained without train.ema_decay): the average "
                            "starts from the current weights at the next step")
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        if self.health is not None and state.get("health"):
            self.health.load_state_dict(state["health"])
        saved = state["ranks"]
        if len(saved) != world_size:
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: image pools of ranks >= %d start empty "
                "and random states are re-seeded, so the run continues but not bit for bit",
                len(saved), world_size, len(saved),
            )
        if rank < len(saved) and saved[rank] is not None:
            self.pools.a.load_state_dict(saved[rank]["pool_a"], self.device)
            self.pools.b.load_state_dict(saved[rank]["pool_b"], self.device)
            if len(saved) == world_size:
                set_rng_state(saved[rank]["rng"], self.device)
                if self.sampling is not None and "sampling" in saved[rank]:
                    self.sampling.load_state_dict(saved[rank]["sampling"])


def _weights(net: torch.nn.Module, buffers: bool) -> dict[str, Any]:
    state = net.state_dict()
    if buffers:
        return state
    names = {name for name, _ in net.named_buffers()}
    return {key: value for key, value in state.items() if key not in names}


# Model settings added after checkpoints were first written: an older checkpoint was built with their defaults.
_MODEL_DEFAULTS = {key: getattr(ModelConfig, key)
                   for key in ("g_variant", "d_variant", "colour_start", "colour_start_images", "channels_a",
                               "channels_b")}


def check_compatible(state: dict[str, Any], cfg: DictConfig, source: str) -> None:
    """Raise CheckpointError naming every model setting in which the checkpoint differs from `cfg`."""
    saved = {**_MODEL_DEFAULTS, **state.get("model", {})}
    wanted = OmegaConf.to_container(cfg.model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    # Initialisation does not shape the networks (nor does how many images a colour transfer was fitted on): a
    # different setting is not a mismatch for a resume.
    diffs = [d for d in diffs if not d.startswith(("model.init_type", "model.init_gain",
                                                   "model.colour_start_images"))]
    if diffs:
        raise CheckpointError(
            f"checkpoint '{source}' was trained with another architecture: " + "; ".join(diffs)
            + ". Resume with the checkpoint's model settings, or start a new run_dir"
        )

