"""The distributed environment, read once from torchrun's (or Submitit's) variables, and reduce helpers."""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import re
import socket
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


def interface_for(address: str) -> str | None:
    """The network interface this host would use to reach `address` (the route's source address), or None."""
    try:
        target = socket.gethostbyname(address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))  # UDP: picks the route, sends nothing.
            local = probe.getsockname()[0]
    except OSError:
        return None
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == local:
            return name
    return None


def _ipv4_of(ifname: str) -> str | None:
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname.encode()[:15]))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def configure_network(socket_ifname: str = "") -> str | None:
    """Choose the interface of gloo's and nccl's sockets before the group forms: GLOO_SOCKET_IFNAME and
    NCCL_SOCKET_IFNAME when set, else `socket_ifname`, else the interface of the route to MASTER_ADDR.

    Without it gloo binds to the address its hostname resolves to, which on a multi-homed node can be an
    interface the other nodes cannot reach (the group then hangs at its first collective).
    """
    master = os.environ.get("MASTER_ADDR", "")
    chosen = socket_ifname or (interface_for(master) if master else None)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if chosen and not os.environ.get(var):
            os.environ[var] = chosen
    return os.environ.get("GLOO_SOCKET_IFNAME") or chosen


# Every rank's (host, address), in rank order, once the group has formed: errors about a lost peer name it.
_HOSTS: list[tuple[str, str]] = []


def hosts() -> list[tuple[str, str]]:
    """Every rank's (hostname, address) in rank order, as gathered when the group formed ([] before)."""
    return list(_HOSTS)


def describe_lost_peer(error: BaseException, me: int) -> str | None:
    """'rank R on host H (address A)' for each other rank whose address the error message names, or None."""
    text = str(error)
    mine = _HOSTS[me][1] if me < len(_HOSTS) else None
    lost = [f"rank {r} on host {h} ({a})" for r, (h, a) in enumerate(_HOSTS)
            if r != me and a and a != mine and re.search(rf"(?<![\d.]){re.escape(a)}(?!\d)", text)]
    return ", ".join(lost) if lost else None


def _answers(address: str, timeout_s: float) -> bool:
    """Whether the host at `address` answers at all: a closed port of a live host refuses at once."""
    try:
        socket.create_connection((address, 9), timeout=timeout_s).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


def unreachable_peers(me: int, timeout_s: float = 3.0,
                      answers: Callable[[str, float], bool] = _answers) -> str | None:
    """'rank R on host H (address A)' for each other rank whose host does not answer at all, or None.

    A TCP connection to a closed port of a live host is refused at once; a host that is down or cut off does
    not answer within `timeout_s`. This names a silent peer, whose loss torch reports only as a timeout. Each
    host is probed once, all at the same time: naming the lost ones takes `timeout_s` at any world size (one
    probe per rank, one after another, took minutes on a cluster whose firewall drops packets).
    """
    mine = _HOSTS[me][1] if me < len(_HOSTS) else None
    ranks_at: dict[str, list[tuple[int, str]]] = {}
    for rank, (host, address) in enumerate(_HOSTS):
        if rank != me and address and address != mine:
            ranks_at.setdefault(address, []).append((rank, host))
    if not ranks_at:
        return None
    with ThreadPoolExecutor(max_workers=min(64, len(ranks_at))) as pool:
        alive = dict(zip(ranks_at, pool.map(lambda address: answers(address, timeout_s), ranks_at)))
    silent = sorted((rank, host, address) for address, ranks in ranks_at.items() if not alive[address]
                    for rank, host in ranks)
    return ", ".join(f"rank {rank} on host {host} ({address})" for rank, host, address in silent) or None


def init_process_group(info: DistInfo, device: torch.device, timeout_s: float = 300.0,
                       single_rank: bool = False, socket_ifname: str = "") -> None:
    """Join the job's process group (nccl on CUDA, gloo on CPU); a no-op at world size 1 unless `single_rank`
    (a group of one: the distributed code path, DDP and collectives included, on one device).

    `timeout_s` bounds every collective: a peer that is lost ends the job after it instead of hanging it.
    Rank 0 then logs every rank's host and address.
    """
    if (info.world_size == 1 and not single_rank) or dist.is_initialized():
        return
    ifname = configure_network(socket_ifname)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        # torchrun keeps one store for all attempts of a job: after it restarts a failed group, the new workers
        # found the old workers' gloo addresses there and failed to connect ("Connection refused"). Each attempt
        # gets its own key space, numbered by how often this rank has started. Not TORCHELASTIC_RESTART_COUNT:
        # it counts per agent, and an agent whose workers were restarted for another node's failure does not
        # count that restart (two hosts then used two key spaces and waited for each other forever).
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                              is_master=info.rank == 0 and not agent_store, timeout=timeout)
        attempt = store.add(f"/pipeline/starts/rank_{info.rank}", 1)
        kwargs.update(store=dist.PrefixStore(f"/pipeline/attempt_{attempt}", store), rank=info.rank,
                      world_size=info.world_size)
    dist.init_process_group(backend, timeout=timeout, **kwargs)
    log.info("rank %d/%d joined the %s process group (interface %s, timeout %.0f s)", info.rank, info.world_size,
             backend, ifname or "chosen by torch", timeout_s)
    address = _ipv4_of(ifname) if ifname else None
    _HOSTS[:] = gather_objects((socket.gethostname(), address or ""))
    if info.is_main:
        log.info("ranks: %s", ", ".join(f"{r} on {h}" + (f" ({a})" if a else "") for r, (h, a) in enumerate(_HOSTS)))


def is_distributed() -> bool:
    """Whether this process is in a process group (of any size): collectives and DDP are then used."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 of the process group, or a process outside any group."""
    return not is_distributed() or dist.get_rank() == 0


def destroy_process_group() -> None:
    """Leave the process group, and free it now rather than at interpreter exit."""
    if dist.is_initialized():
        # The training's DDP wrappers sit in reference cycles that hold the gloo group alive after run()
        # returns; left to interpreter finalisation, its C++ threads were destroyed joinable and the rank died
        # of SIGABRT ("terminate called without an active exception") after a successful run, in 2 of 20
        # 2-rank runs on a loaded machine. Collecting them first lets the group be destroyed here, in order.
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group_teardown() -> Iterator[None]:
    """Around a training: the process group is destroyed when it ends, also when it raises. An exception's
    traceback holds the finished frames of the training, and through them its DDP wrappers, out of the
    collector's reach: those frames are cleared first (their code and line numbers stay for the report)."""
    try:
        yield
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); identity when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place); identity when not distributed."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
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
