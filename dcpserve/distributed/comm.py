"""Tensor collectives over the TP and DCP groups. Each is a no-op on a group of one."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

# torch 2.13 renames the *_tensor collectives (*_single); torch 2.11 (our GPU image) has only the old names.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*_single`",
                        category=FutureWarning)

from dcpserve.distributed.parallel import ParallelState


def tp_all_reduce(ps: ParallelState, x: torch.Tensor) -> torch.Tensor:
    if ps.tp_size > 1:
        dist.all_reduce(x, group=ps.tp_group)
    return x


def tp_all_gather_last(ps: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's shard along the last dim (vocab-parallel logits)."""
    if ps.tp_size == 1:
        return x
    out = _gather_stacked(x, ps.tp_size, ps.tp_group)
    return torch.cat(out.unbind(0), dim=-1)


def dcp_all_gather(ps: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """[...] -> [d, ...]: every DCP rank's tensor, stacked in DCP-rank order."""
    if ps.dcp_size == 1:
        return x.unsqueeze(0)
    return _gather_stacked(x, ps.dcp_size, ps.dcp_group)


def dcp_all_to_all(ps: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """x[p] goes to DCP rank p; returns y with y[p] = what rank p sent here. x: [d, ...]."""
    if ps.dcp_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # not empty_like: x's strides may be permuted
    dist.all_to_all_single(out, x, group=ps.dcp_group)
    return out


def dcp_reduce_scatter(ps: ParallelState, x: torch.Tensor) -> torch.Tensor:
    """x: [d, ...]; returns sum over ranks of x[my dcp rank]."""
    if ps.dcp_size == 1:
        return x[0]
    shape = tuple(x.shape[1:])
    flat = x.contiguous().view((-1,) + shape[1:]) if len(shape) else x.contiguous()
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, flat, group=ps.dcp_group)
    return out


def _gather_stacked(x: torch.Tensor, n: int, group) -> torch.Tensor:
    # all_gather_into_tensor concatenates along dim 0; view the result as [n, *x.shape].
    x = x.contiguous()
    if x.dim() == 0:
        x = x.view(1)
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out.view((n,) + tuple(x.shape))
