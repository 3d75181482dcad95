"""torchrun environment: process group set-up and the few collectives the trainer needs.

Everything is read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); the device comes from LOCAL_RANK.
NCCL on CUDA, gloo on CPU. A single process without torchrun runs with world_size 1 and no process group.

Besides the training group there is a small gloo "control" group on CPU tensors: the ranks agree on stop requests
(preemption signals, non-finite losses) through it without touching the GPU stream, and its collectives can run
asynchronously next to DDP's.

Both groups time out a collective after the run's collective timeout (run.collective_timeout_s); the rank that
times out then holds a roll call in the rendezvous store (`unresponsive_ranks`) to name the ranks that stopped
answering.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastfit.errors import FastfitError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise FastfitError(f"environment variable {name} must be an integer (torchrun sets it), got {raw!r}") from None


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise FastfitError("run.device = 'cuda' but no CUDA device is visible; use run.device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


_CONTROL: dist.ProcessGroup | None = None  # the gloo control group of this process, once set up


def setup_distributed(requested_device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    global _CONTROL
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **_restart_safe_store(rank, world_size, timeout),
        )
    if world_size > 1 and _CONTROL is None:
        # Every rank creates it at the same point, as group creation is collective.
        _CONTROL = dist.new_group(backend="gloo", timeout=timeout)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _restart_safe_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """init_process_group arguments that survive torchrun restarts (--max-restarts).

    With torchrun's shared rendezvous store (TORCHELASTIC_USE_AGENT_STORE=True, its default) the store outlives
    the worker group, and process groups find their peers through keys in it that carry no restart attempt: a
    restarted group reads the dead group's addresses and fails with "connectFullMesh … Connection refused" (gloo)
    or a stale NCCL id (pytorch/pytorch#135712, #167288). Scoping our keys by the attempt number gives every attempt
    a clean namespace. Attempt numbers agree on one node; multi-node elastic jobs should set
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun instead (docs/reliability.md), and then this is not used."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    store.set_timeout(timeout)
    return {
        "store": dist.PrefixStore(f"fastfit/attempt-{restart_count()}", store),
        "rank": rank,
        "world_size": world_size,
    }


def cleanup_distributed(graceful: bool = True) -> None:
    """Destroy the process groups after a run every rank finished together. After a failure the groups are left
    alone: destroying them can wait on a peer that is gone, and process exit closes the connections anyway (which is
    what tells the other ranks to stop)."""
    global _CONTROL
    if dist.is_initialized() and graceful:
        dist.destroy_process_group()
    _CONTROL = None


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's value on every rank (for small host-side values such as a resolved checkpoint path)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def control_all_reduce(tensor: torch.Tensor, env: DistEnv, async_op: bool = False):
    """Element-wise max of a small CPU int64 tensor over ranks through the gloo control group (never a GPU sync);
    returns the Work handle with async_op=True, else None."""
    if not env.distributed:
        return None
    return dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_CONTROL, async_op=async_op)


def control_barrier(env: DistEnv) -> None:
    """Wait for every rank on the control group; bounded by the group's timeout, and a dead peer fails it at once."""
    if env.distributed:
        dist.barrier(group=_CONTROL)


# How collectives report that another process of the group went away (gloo, NCCL): then that process's own error
# is the one the user must read, not this one.
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
    "NCCL communicator was aborted",
    "ncclRemoteError",
)


def is_peer_failure(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, RuntimeError) and any(marker in text for marker in _PEER_GONE)


# How a collective reports that the group's timeout (run.collective_timeout_s) ran out: gloo, NCCL's watchdog.
_TIMED_OUT = ("Timed out waiting", "collective operation timeout", "timed out")


def is_peer_timeout(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(marker in str(err) for marker in _TIMED_OUT)


def unresponsive_ranks(env: DistEnv, wait_s: float) -> list[int] | None:
    """After a collective timed out on this rank: the ranks that do not answer a roll call in the rendezvous store
    within `wait_s`. Every rank whose collective timed out answers it, so those missing are stopped, hung, or busy
    outside the collective. None when the store itself does not answer (its host may be the stopped process)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=wait_s))
        prefix = f"fastfit/roll-call/attempt-{restart_count()}/rank-"
        store.set(f"{prefix}{env.rank}", "here")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(env.world_size) if not store.check([f"{prefix}{r}"])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, ValueError):  # a store that timed out or is gone; ValueError: no default group
        return None


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first attempt or without torchrun)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def gather_to_main(obj, env: DistEnv) -> list | None:
    """Every rank's small picklable `obj` (CPU tensors only), as a list by rank on rank 0 and None elsewhere; every
    rank must call it. Travels on the control group (gloo), so CUDA tensors must be moved to the CPU first."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, gathered, dst=0, group=_CONTROL)
    return gathered
