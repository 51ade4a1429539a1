"""Attention backends. A backend computes attention of some heads over a set of latent KV rows and returns
`(out, lse)`: out [n, heads, v_dim] fp32 and the natural-log sum-exp of the scaled scores [n, heads]
(-inf and a zero output where a query sees no key). DCP (query gather, merge, top-k filtering) lives
outside the backends, so each backend gets it for free."""
from __future__ import annotations

from typing import Protocol

import torch


class AttentionBackend(Protocol):
    def attend(self, q: torch.Tensor, kv: torch.Tensor, v_dim: int, scale: float,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, H, D], kv [m, D] (the first `v_dim` columns are the values), mask [n, m] bool (True = attend)."""
        ...


class TorchBackend:
    """The reference: plain fp32 math, any shape."""

    def attend(self, q: torch.Tensor, kv: torch.Tensor, v_dim: int, scale: float,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n, h, _ = q.shape
        if kv.shape[0] == 0:
            return q.new_zeros(n, h, v_dim, dtype=torch.float32), q.new_full((n, h), float("-inf"), dtype=torch.float32)
        kvf = kv.float()
        scores = torch.einsum("nhd,md->nhm", q.float(), kvf) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
        out = torch.einsum("nhm,mv->nhv", p, kvf[:, :v_dim])
        return out, lse


def get_backend(name: str) -> AttentionBackend:
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        from dcpserve.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}")
