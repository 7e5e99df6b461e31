"""Ranks of a build or a training run: torchrun's environment, or N local processes (``--procs N``).

:class:`DistContext` is where this process stands (rank, world size, device) and the few
collectives the callers need; alone (WORLD_SIZE 1) every collective is a no-op.
``torch.distributed`` is used with gloo on CPU, nccl on CUDA.

* A build needs one collective: a barrier after rank 0 has created the cache's root and
  epoch groups (see :func:`logitcache.build.loop.build`); after it every rank writes its own
  units (round-robin) and nothing else is shared.
* The trainer (DDP) also averages its logged step values over the ranks (:meth:`DistContext.means`).
* torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``;
  :func:`init_from_env` joins the group with ``env://``.
* :func:`run_procs` starts N processes on this machine (start method "spawn": nothing
  forked from a parent that may hold zarr/fsspec state). Each child gets the same
  variables plus ``LOGITCACHE_INIT_METHOD=file://...`` (a FileStore in a temporary folder:
  no port to pick, nothing listening on the network) and then runs the same code path as
  a torchrun rank. Each child starts its own DataLoader workers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch

#: Rendezvous URL for torch.distributed.init_process_group; default "env://" (torchrun).
ENV_INIT_METHOD = "LOGITCACHE_INIT_METHOD"


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched as one of several ranks)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0)


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this rank's GPU (``cuda:LOCAL_RANK``) when there are
    several ranks; any other device is returned as given."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", env_local_rank() % max(1, torch.cuda.device_count()))
    return device


@dataclass
class DistContext:
    """Where this process stands: rank r of world_size, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    initialised: bool = False  # this context created the process group (close() destroys it)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes shared files (logs, checkpoints, summaries)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        if dist.get_backend() == "nccl" and self.device is not None:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def means(self, values: torch.Tensor) -> list[float]:
        """The means over ranks of a vector of scalars (float32): one collective, one device sync."""
        values = values.detach().float()
        if self.world_size > 1:
            import torch.distributed as dist

            values = values.clone()
            dist.all_reduce(values)
            values /= self.world_size
        return values.tolist()

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialised = False


def init_from_env(device: torch.device) -> DistContext:
    """Join the process group described by the environment, if WORLD_SIZE > 1 (``device``:
    this rank's, see :func:`rank_device`).

    Backend: nccl when ``device`` is CUDA, else gloo. Rendezvous: $LOGITCACHE_INIT_METHOD,
    else ``env://`` (MASTER_ADDR/MASTER_PORT, as torchrun sets them).
    """
    world = env_world_size()
    if world <= 1:
        return DistContext(device=device)
    if "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but RANK is not set (launch with torchrun or --procs)")
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), env_local_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # the caller's group: used, and left to the caller to destroy
        return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)
    if device.type == "cuda":
        dist.init_process_group("nccl", init_method=os.environ.get(ENV_INIT_METHOD, "env://"), rank=rank,
                                world_size=world, device_id=device)
    else:
        dist.init_process_group("gloo", init_method=os.environ.get(ENV_INIT_METHOD, "env://"), rank=rank,
                                world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, initialised=True)


def _child(local_rank: int, fn: Callable[[], None], nprocs: int, init_method: str) -> None:
    """Entry point of one process started by :func:`run_procs` (module level: picklable)."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), **{ENV_INIT_METHOD: init_method})
    # No network may be configured: gloo should talk over loopback.
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # A spawned child inherits "spawn" as its default start method, so its DataLoader
    # workers would re-import torch and timm (seconds each); use the platform's default,
    # as a one-process build does.
    import multiprocessing

    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    if "OMP_NUM_THREADS" not in os.environ:
        # Share the cores instead of each rank spinning up one thread per core (torchrun
        # sets OMP_NUM_THREADS=1 for the same reason).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    from logitcache.errors import LogitcacheError

    try:
        fn()
    except LogitcacheError as e:
        print(f"error: [rank {local_rank}/{nprocs}] {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_procs(fn: Callable[[], None], nprocs: int) -> int:
    """Run ``fn()`` in ``nprocs`` fresh processes as ranks 0..nprocs-1 of one group.

    ``fn`` must be picklable (a module-level function or a functools.partial of one).
    Returns 0 when every rank succeeded. When one fails, torch terminates the others;
    if a rank stopped on a LogitcacheError (already printed on one line, exit code 2)
    this returns 2, else the failing rank's traceback is raised here.
    """
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="logitcache-rdzv-")
    try:
        init_method = "file://" + os.path.join(tmp, "store")
        context = mp.start_processes(_child, args=(fn, nprocs, init_method), nprocs=nprocs, join=False,
                                     start_method="spawn")
        try:
            while not context.join():
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            # The first failure may be another rank's consequence of it (peer closed in
            # the barrier): a rank that printed a user error decides.
            if any(p.exitcode == 2 for p in context.processes):
                return 2
            if isinstance(e, mp.ProcessExitedException):
                return e.exit_code if e.exit_code and e.exit_code > 0 else 1
            raise
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
