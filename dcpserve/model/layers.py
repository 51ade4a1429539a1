"""Plain-PyTorch building blocks with tensor parallelism. Each module loads its own weights from a reader,
given its checkpoint prefix, taking only this rank's shard."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcpserve.distributed.comm import tp_all_gather_last, tp_all_reduce
from dcpserve.distributed.parallel import ParallelState
from dcpserve.loader.fp8 import Fp8Weight
from dcpserve.loader.reader import FULL, Reader, ShardSpec


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF's DeepseekV3RMSNorm of x (of x + residual when given, which is also returned, rounded to x's dtype
    as the residual stream is). The reference of kernels/rmsnorm.py."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(x.dtype)
    if out is not None:
        out.copy_(y)
        y = out
    return y, (x if residual is not None else None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps
        self.fused = False  # set by the runner with the Triton backend: one kernel per call (kernels/rmsnorm.py)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._norm(x, None, out)[0]

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add of the layer before, fused into the norm."""
        return self._norm(x, residual, None)

    def _norm(self, x, residual, out):
        if self.fused:
            from dcpserve.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual, out)
        return rms_norm_ref(x, self.weight, self.eps, residual, out)

    def load(self, r: Reader, prefix: str) -> None:
        self.weight.data = r.get(prefix + ".weight", tuple(self.weight.shape))


class Linear(nn.Module):
    """y = x W^T with W [out, in], holding shard `shard` of the full weight. `reduce` all-reduces the
    output over TP (row-parallel); column-parallel layers need no communication.

    The weight may be kept in DeepSeek's block fp8 (`weight` e4m3 plus `weight_scale_inv`, loader/fp8.py) when
    the reader returns it so; then the Triton backend multiplies with the e4m3 bytes directly
    (kernels/fp8_linear.py) and the torch path dequantizes per call (the reference)."""

    def __init__(self, in_features: int, out_features: int, shard: ShardSpec = FULL, ps: ParallelState | None = None,
                 reduce: bool = False):
        super().__init__()
        self.full_shape = (out_features, in_features)
        self.shard = shard
        shape = list(self.full_shape)
        if shard.dim is not None:
            shape[shard.dim] //= shard.parts
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.weight_scale_inv: torch.Tensor | None = None  # fp32 block scales when `weight` is e4m3
        self.block = (128, 128)
        self.fused = False  # set by the runner with the Triton backend
        self.ps, self.reduce = ps, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is None:
            y = F.linear(x, self.weight)
        elif self.fused:
            from dcpserve.kernels.fp8_linear import fp8_linear

            y = fp8_linear(x, self.weight, self.weight_scale_inv, self.block)
        else:
            from dcpserve.kernels.fp8_linear import fp8_linear_ref

            y = fp8_linear_ref(x, self.weight, self.weight_scale_inv, self.block)
        if self.reduce:
            tp_all_reduce(self.ps, y)
        return y

    def load(self, r: Reader, prefix: str, fp8: bool = True) -> None:
        """fp8=False: always the model dtype (a weight other code reads as a plain matrix)."""
        w = r.get_linear(prefix + ".weight", self.full_shape, self.shard) if fp8 else \
            r.get(prefix + ".weight", self.full_shape, self.shard)
        if isinstance(w, Fp8Weight):
            self.weight.data, self.weight_scale_inv, self.block = w.q, w.scale, w.block
        else:
            self.weight.data, self.weight_scale_inv = w, None


def column_parallel(in_f: int, out_f: int, ps: ParallelState) -> Linear:
    return Linear(in_f, out_f, ShardSpec(0, ps.tp_rank, ps.tp_size), ps)


def row_parallel(in_f: int, out_f: int, ps: ParallelState, reduce: bool = True) -> Linear:
    return Linear(in_f, out_f, ShardSpec(1, ps.tp_rank, ps.tp_size), ps, reduce=reduce)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, ps: ParallelState):
        super().__init__()
        self.ps, self.vocab, self.dim = ps, vocab, dim
        self.per = vocab // ps.tp_size
        self.start = ps.tp_rank * self.per
        self.weight = nn.Parameter(torch.empty(self.per, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.per)
        out = F.embedding(local.clamp(0, self.per - 1), self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return tp_all_reduce(self.ps, out)

    def load(self, r: Reader, prefix: str) -> None:
        self.weight.data = r.get(prefix + ".weight", (self.vocab, self.dim), ShardSpec(0, self.ps.tp_rank, self.ps.tp_size))


class ParallelLMHead(nn.Module):
    def __init__(self, vocab: int, dim: int, ps: ParallelState):
        super().__init__()
        self.ps, self.vocab, self.dim = ps, vocab, dim
        self.weight = nn.Parameter(torch.empty(vocab // ps.tp_size, dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tp_all_gather_last(self.ps, F.linear(x, self.weight))

    def load(self, r: Reader, prefix: str) -> None:
        self.weight.data = r.get(prefix + ".weight", (self.vocab, self.dim), ShardSpec(0, self.ps.tp_rank, self.ps.tp_size))


class DenseMLP(nn.Module):
    """SwiGLU MLP, gate/up column-parallel, down row-parallel. `reduce=False` leaves the all-reduce to the
    caller (the MoE block sums shared and routed experts first and reduces once)."""

    def __init__(self, hidden: int, inter: int, ps: ParallelState, reduce: bool = True):
        super().__init__()
        self.gate_proj = column_parallel(hidden, inter, ps)
        self.up_proj = column_parallel(hidden, inter, ps)
        self.down_proj = row_parallel(inter, hidden, ps, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def load(self, r: Reader, prefix: str) -> None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(self, name).load(r, f"{prefix}.{name}")
