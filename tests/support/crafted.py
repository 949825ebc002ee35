"""Checkpoints for the tests: small states written the way training writes them, and files crafted to run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from pipeline.engine.checkpoint import Checkpointer
from pipeline.engine.checkpoint.codec import json_tensor
from pipeline.engine.checkpoint.dcp_io import METADATA


class RunsCode:
    """Unpickled, it would create the file `pwned` in the working directory."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def header(step: int, world_size: int = 1) -> dict:
    return {"format": "cyclegan-pipeline/2", "step": step, "world_size": world_size, "model": {}, "config": ""}


def shared(step: int) -> dict:
    """Replicated state as training has it: a network's tensors and an Adam state (integer keys, tuples)."""
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], lr=1e-3 / 3, betas=(0.5, 0.999))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {"nets": {"G_ab": {"w": torch.full((8,), float(step))}}, "opt_g": opt.state_dict()}


def own(rank: int) -> dict:
    """One rank's state: a pool and random states."""
    return {"pool_a": {"images": torch.full((2, 3, 4, 4), float(rank)), "generator": torch.Generator().get_state()},
            "rng": {"python": [3, list(range(625)), None]}}


def write(directory: Path, step: int, **kwargs) -> list:
    """One checkpoint of `step` in `directory`, written and waited for; returns the writes' outcomes."""
    writer = Checkpointer(directory, keep_last=kwargs.pop("keep_last", 3), **kwargs)
    writer.save(step, header(step), shared(step), own(0), final=True)
    return writer.close()


def crafted_directories(root: Path) -> dict[str, Path]:
    """Checkpoint directories each crafted to run code when a careless reader opens them."""
    import torch.distributed.checkpoint as dcp

    made = {}
    # DCP's metadata is a pickle, which DCP itself reads with pickle.load.
    made["metadata"] = root / "a" / "ckpt-000000001"
    write(made["metadata"].parent, 1)
    (made["metadata"] / METADATA).write_bytes(pickle.dumps(RunsCode()))
    # A record of the data file: DCP reads tensors with torch.load(weights_only=True).
    made["record"] = root / "b" / "ckpt-000000001"
    write(made["record"].parent, 1)
    data = made["record"] / "__0_0.distcp"
    evil = pickle.dumps(RunsCode())
    blob = data.read_bytes()
    data.write_bytes(evil + blob[len(evil):])
    # An entry saved as a pickled object (DCP's own planner loads those with weights_only=False).
    made["object"] = root / "c" / "ckpt-000000001"
    made["object"].parent.mkdir(parents=True)
    dcp.save({"header": json_tensor({**header(1), "skeleton": {"x": {"$tensor": "shared/x"}}}),
              "shared/x": RunsCode(), "rank/0.skeleton": json_tensor({})},
             storage_writer=dcp.FileSystemWriter(made["object"]), no_dist=True)
    return made
