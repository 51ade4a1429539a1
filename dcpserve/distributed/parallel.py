"""Process groups: the world (= one TP group for now), DCP groups of `dcp` consecutive ranks, and a CPU
(gloo) group for control messages. One `ParallelState` per process, created once at start-up."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int
    tp_size: int
    dcp_size: int
    device: torch.device
    tp_group: dist.ProcessGroup | None = None
    dcp_group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dcp_rank(self) -> int:
        # DCP groups are contiguous slices of the TP group, so a merged head chunk lines up with the
        # o_proj shard of the same rank (DESIGN section 2, step 8).
        return self.tp_rank % self.dcp_size

    @property
    def dcp_ranks(self) -> list[int]:
        base = self.rank - self.dcp_rank
        return list(range(base, base + self.dcp_size))


def init_parallel(rank: int, tp: int, dcp: int, device: torch.device, init_method: str,
                  timeout_s: int = 120) -> ParallelState:
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = dict(backend=backend, init_method=init_method, rank=rank, world_size=tp, timeout=timeout)
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    state = ParallelState(rank=rank, tp_size=tp, dcp_size=dcp, device=device)
    state.tp_group = dist.group.WORLD
    state.cpu_group = dist.new_group(list(range(tp)), backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    # Every rank must create every group, in the same order.
    for start in range(0, tp, dcp):
        ranks = list(range(start, start + dcp))
        group = dist.new_group(ranks, backend=backend, timeout=timeout) if dcp > 1 else None
        if rank in ranks:
            state.dcp_group = group
    return state


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
