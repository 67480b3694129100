"""Several processes on one job: plain ``torch.distributed``, as ``torchrun`` starts it.

``torchrun --nproc_per_node N -m uspx trace ...`` sets ``RANK``, ``WORLD_SIZE`` and the rendezvous
variables; :func:`current` joins the process group on first use (gloo on CPU; nccl when the
machine has GPUs, each process on ``cuda:LOCAL_RANK``) and says which share of the work this
process takes. Work is split by whole units in a fixed order (trace shards, batches: unit ``s``
goes to rank ``s % world``), so the files a run writes do not depend on how many processes wrote
them. A single process (no ``WORLD_SIZE``, or 1)
never touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where the collectives' tensors live: this process's GPU under nccl

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, unit: int) -> bool:
        """Whether work unit ``unit`` (0, 1, 2, ... in a fixed order) is this process's."""
        return unit % self.world == self.rank

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if not self.active:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def sum(self, array):
        """The element-wise sum of ``array`` (numpy) over every rank, on every rank."""
        if not self.active:
            return array
        import numpy as np
        import torch
        import torch.distributed as td

        t = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        td.all_reduce(t, op=td.ReduceOp.SUM)
        return t.cpu().numpy()


_SOLO = [0]  # depth of solo() blocks


@contextmanager
def solo() -> Iterator[None]:
    """Within the block this process works alone (rank 0 finishing what the others handed it):
    the stages it calls must not wait for the other processes."""
    _SOLO[0] += 1
    try:
        yield
    finally:
        _SOLO[0] -= 1


def current() -> Dist:
    """This process's place in the job: joins the process group when started by torchrun."""
    import torch.distributed as td

    if _SOLO[0]:
        return Dist()
    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), _device(td))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        # one GPU per process, chosen by its place on its machine (torchrun's LOCAL_RANK)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            from uspx.io import UspxError

            raise UspxError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPUs; start at most "
                            "that many processes on it (--nproc_per_node)")
        torch.cuda.set_device(local)
        td.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
    else:
        td.init_process_group(backend="gloo")
    return Dist(td.get_rank(), td.get_world_size(), _device(td))


def _device(td) -> str:
    if td.get_backend() != "nccl":
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.current_device()}"
