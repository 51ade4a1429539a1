"""Rotary position embedding of the rope slice of queries and keys, written where the caller wants it.

  rope(x, positions, cos, sin, interleaved, out=None) -> out
    x:         [T, R] or [T, H, R] (any strides, unit stride on R), bf16/fp16/fp32; R = rope dims
    positions: int [T];  cos, sin: [P, R/2] tables (model dtype, already scaled, as RotaryEmbedding builds)
    out:       same shape as x, may be x itself (in place) or a slice of a larger tensor (the rope columns of
               MLA's absorbed query or of the latent row), so no torch.cat follows
    interleaved: pairs (x0, x1), (x2, x3), ... rotate and land de-interleaved (rotated evens, then rotated
               odds), as HF's MLA rope does; otherwise rotate-half (x[:R/2], x[R/2:]).

Each product and sum is rounded to the output dtype as the torch expression `x1 * cos - x2 * sin` rounds
(three roundings), so the kernel returns the reference's bits. In torch the same rope is ~9 kernels (two
table gathers, four products, two sums, a cat); MLA runs it four times per layer.

The torch reference is `dcpserve.model.rope.rope_ref` (pure torch: usable where Triton is not installed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcpserve.kernels.rmsnorm import round_to
from dcpserve.model.rope import rope_ref  # noqa: F401  (the torch reference: the model's non-Triton path)


@triton.jit
def _rope_kernel(x_ptr, stride_xt, stride_xh, pos_ptr, cos_ptr, sin_ptr, stride_c, y_ptr, stride_yt, stride_yh,
                 n_heads, INTERLEAVED: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per (token, block of heads); it loads all it rotates before storing, so out may alias x."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, HALF)
    m = (h < n_heads)[:, None]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_c + i).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_c + i).to(tl.float32)[None, :]
    if INTERLEAVED:
        c1, c2 = 2 * i, 2 * i + 1
    else:
        c1, c2 = i, i + HALF
    src = x_ptr + t * stride_xt + h[:, None].to(tl.int64) * stride_xh
    x1 = tl.load(src + c1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + c2[None, :], mask=m, other=0.0).to(tl.float32)
    dt: tl.constexpr = y_ptr.dtype.element_ty
    y1 = round_to(round_to(x1 * c, dt) - round_to(x2 * s, dt), dt)
    y2 = round_to(round_to(x2 * c, dt) + round_to(x1 * s, dt), dt)
    dst = y_ptr + t * stride_yt + h[:, None].to(tl.int64) * stride_yh
    tl.store(dst + i[None, :], y1.to(dt), mask=m)
    tl.store(dst + HALF + i[None, :], y2.to(dt), mask=m)


def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
         out: torch.Tensor | None = None) -> torch.Tensor:
    if (x.dim() not in (2, 3) or x.stride(-1) != 1 or x.shape[-1] != 2 * cos.shape[-1] or cos.stride(-1) != 1
            or sin.shape != cos.shape or sin.stride() != cos.stride()):
        raise ValueError(f"rope wants x [T, (H,) R] with unit stride on R and tables [P, R/2]; got x "
                         f"{tuple(x.shape)} stride {x.stride()}, cos {tuple(cos.shape)}")
    y = out if out is not None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype),
                                                device=x.device)
    if y.shape != x.shape or y.stride(-1) != 1:
        raise ValueError(f"rope out {tuple(y.shape)} (stride {y.stride()}) must match x {tuple(x.shape)}")
    t, r = x.shape[0], x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    if t == 0 or heads == 0:
        return y
    sx = x.stride(1) if x.dim() == 3 else 0
    sy = y.stride(1) if y.dim() == 3 else 0
    block_h = min(triton.next_power_of_2(heads), max(1, 2048 // r))
    grid = (t, triton.cdiv(heads, block_h))
    _rope_kernel[grid](x, x.stride(0), sx, positions, cos, sin, cos.stride(0), y, y.stride(0), sy, heads,
                       INTERLEAVED=interleaved, HALF=r // 2, BLOCK_H=block_h, num_warps=4)
    return y
