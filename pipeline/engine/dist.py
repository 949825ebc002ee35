"""The distributed environment, read once from torchrun's (or Submitit's) variables, and reduce helpers."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def read_env() -> DistInfo:
    """DistInfo from RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE; a plain `python` start is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


def select_device(requested: str, info: DistInfo) -> torch.device:
    """One CUDA device per LOCAL_RANK when CUDA is used, else the CPU."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no CUDA device; use train.device=cpu or auto")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def init_process_group(info: DistInfo, device: torch.device, timeout_s: float = 600.0,
                       single_rank: bool = False) -> None:
    """Join the job's process group (nccl on CUDA, gloo on CPU); a no-op at world size 1 unless `single_rank`
    (a group of one: the distributed code path, DDP and collectives included, on one device)."""
    if (info.world_size == 1 and not single_rank) or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # After torchrun restarts a failed group, the new workers found the old workers' gloo addresses in the
        # agent's store and failed to connect ("Connection refused"): give each attempt its own key space.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                              is_master=info.rank == 0 and not agent_store, timeout=timeout)
        kwargs.update(store=dist.PrefixStore(f"/pipeline/attempt_{restart}", store), rank=info.rank,
                      world_size=info.world_size)
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    log.info("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)


def is_distributed() -> bool:
    """Whether this process is in a process group (of any size): collectives and DDP are then used."""
    return dist.is_available() and dist.is_initialized()


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); identity when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj` in rank order, on every rank (a list of one when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: object) -> list[object] | None:
    """Every rank's `obj` in rank order on rank 0, None on the other ranks ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: object) -> object:
    """Rank 0's `obj` on every rank (a collective; `obj` itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
