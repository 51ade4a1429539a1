"""LSE merge of attention partials (Triton), same semantics as `dcpserve.attention.merge.merge_partials`.

Inputs:  outs [n, ..., V] (any float dtype, last dim contiguous after flattening), lses [n, ...] natural-log
         LSEs of the same partials. NaN / +inf LSEs are treated as empty partials (-inf).
Outputs: out fp32 [..., V] = sum_i exp(lse_i - L) * outs_i, lse fp32 [...] = L = logsumexp_i lse_i;
         0 and -inf where every partial is empty. A partial with zero weight is never read, so garbage
         (even NaN) in an empty partial's output cannot leak into the result.
Used for the split-KV combine of the decode kernels and for merging DCP partials after the all-to-all.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcpserve.kernels._common import fix_interpreter_scalars, interpreting, next_pow2

fix_interpreter_scalars()


@triton.jit
def lse_weights(lse):
    """Merge weights of the partials' LSEs (a vector over partials; padding lanes -inf): (w, total LSE, any).
    NaN / +inf count as empty; w is exactly 0 for empty partials, and all-empty gives w = 0, LSE -inf.
    Shared with the peer-to-peer merge of `kernels/p2p.py`, so both merges round identically."""
    ok = (lse == lse) & (lse != float("inf"))  # drops NaN (x != x) and +inf
    lse = tl.where(ok, lse, float("-inf"))
    mx = tl.max(lse, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx_safe)  # exactly 0 for empty partials
    tot = tl.sum(w, 0)
    has = tot > 0.0
    w = w / tl.where(has, tot, 1.0)
    total = tl.where(has, mx_safe + tl.log(tl.where(has, tot, 1.0)), float("-inf"))
    return w, total


@triton.jit
def _merge_lse_kernel(outs_ptr, lses_ptr, out_ptr, lse_ptr, n_parts, V,
                      stride_on, stride_om, stride_ln, stride_lm, stride_out_m,
                      BLOCK_P: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    lse = tl.load(lses_ptr + p * stride_ln + row * stride_lm, mask=p < n_parts, other=float("-inf")).to(tl.float32)
    w, total = lse_weights(lse)
    v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = v < V
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for i in range(n_parts):
        wi = tl.sum(tl.where(p == i, w, 0.0), 0)
        live = vmask & (tl.full([BLOCK_V], 0.0, tl.float32) + wi > 0.0)  # skip reads of empty partials
        o = tl.load(outs_ptr + i * stride_on + row * stride_om + v, mask=live, other=0.0)
        acc += wi * o.to(tl.float32)
    tl.store(out_ptr + row * stride_out_m + v, acc, mask=vmask)
    if vb == 0:
        tl.store(lse_ptr + row, total)


def merge_lse(outs: torch.Tensor, lses: torch.Tensor, out: torch.Tensor | None = None,
              lse_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """outs [n, ..., V], lses [n, ...] -> (out fp32 [..., V], lse fp32 [...]).

    `out` / `lse_out` (optional, contiguous fp32) let callers write into preallocated buffers (graphs)."""
    if outs.shape[:-1] != lses.shape:
        raise ValueError(f"outs {tuple(outs.shape)} and lses {tuple(lses.shape)} disagree")
    n, lead, v_dim = outs.shape[0], outs.shape[1:-1], outs.shape[-1]
    o3 = outs.reshape(n, -1, v_dim)
    if o3.stride(2) != 1:
        o3 = o3.contiguous()
    l2 = lses.reshape(n, -1)
    m = o3.shape[1]
    if out is None:
        out = torch.empty(m, v_dim, dtype=torch.float32, device=outs.device)
    if lse_out is None:
        lse_out = torch.empty(m, dtype=torch.float32, device=outs.device)
    out2, lse1 = out.view(m, v_dim), lse_out.view(m)
    if m > 0:
        block_v = min(next_pow2(v_dim), 64 if interpreting() else 512)
        grid = (m, triton.cdiv(v_dim, block_v))
        _merge_lse_kernel[grid](o3, l2, out2, lse1, n, v_dim,
                                o3.stride(0), o3.stride(1), l2.stride(0), l2.stride(1), out2.stride(0),
                                BLOCK_P=max(2, next_pow2(n)), BLOCK_V=block_v, num_warps=4)
    return out.view(*lead, v_dim), lse_out.view(*lead)


def merge_lse_ref(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: fp32 LSE merge; empty (non-finite LSE) partials contribute exactly nothing."""
    lse = lses.float()
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("-inf")))
    total = torch.logsumexp(lse, dim=0)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    w = torch.exp(lse - safe)  # 0 where lse is -inf
    contrib = torch.where(w[..., None] > 0, outs.float() * w[..., None], torch.zeros((), device=outs.device))
    return contrib.sum(0), total
