"""Merging partial attention results by log-sum-exp (DESIGN section 2, step 5).

Each of `n` partials holds `out_i = softmax-weighted sum over its keys` and `lse_i = log sum exp(scores)`
(natural log) over the same keys. The exact result over the union of the keys is
`out = sum_i exp(lse_i - L) * out_i` with `L = logsumexp_i lse_i`. A partial with no keys has
`lse = -inf` and contributes nothing; NaN or +inf LSEs (a broken shard) are treated as empty rather than
poisoning the sum. All math in fp32.
"""
from __future__ import annotations

import torch


def sanitize_lse(lse: torch.Tensor) -> torch.Tensor:
    lse = lse.float()
    return torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("-inf")))


def merge_weights(lse: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-partial weights exp(lse_i - L) (0 for empty partials) and the merged L, along `dim`."""
    lse = sanitize_lse(lse)
    total = torch.logsumexp(lse, dim=dim, keepdim=True)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    w = torch.where(torch.isfinite(lse), torch.exp(lse - safe_total), torch.zeros_like(lse))
    return w, total.squeeze(dim)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """outs: [n, ..., D], lses: [n, ...] -> (out [..., D] fp32, lse [...]). Zero output where all are empty."""
    w, total = merge_weights(lses, dim=0)
    return weighted(outs, w).sum(0), total


def weighted(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out * w[..., None], exactly 0 where w == 0: an empty partial's buffer may hold garbage (even NaN)."""
    w = w.unsqueeze(-1)
    return torch.where(w > 0, out.float() * w, torch.zeros((), dtype=torch.float32, device=out.device))
