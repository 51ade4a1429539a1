"""RMSNorm, optionally fused with the residual add before it, in one pass over each row.

  rms_norm(x, weight, eps, residual=None, out=None) -> (y, new_residual)
    x:        [T, N] (any row stride, unit column stride), bf16/fp16/fp32
    residual: None, or [T, N] like x: the kernel first forms s = x + residual (rounded to x's dtype, as a
              torch add rounds), returns it as new_residual and normalizes s; without it new_residual is None
    weight:   [N];  out: optional [T, N] destination (may be a strided view into a larger tensor)
    y = weight * round(s * rsqrt(mean(s^2) + eps)), the reference's two roundings (HF's DeepseekV3RMSNorm)

A decoder layer in torch is eight elementwise and reduction kernels per norm (cast, square, mean, add, rsqrt,
scale, cast back, weight) plus the residual add; at decode batch sizes each costs a launch and ~1-2 us of
GPU time for a few KB of data, which over four norms per layer was a sizeable share of a batch-1 step.

The torch reference is `dcpserve.model.layers.rms_norm_ref` (pure torch: usable where Triton is not installed).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcpserve.kernels.kv_write import _bf16_rne_bits
from dcpserve.model.layers import rms_norm_ref  # noqa: F401  (the torch reference: the model's non-Triton path)


@triton.jit
def round_to(v, DT: tl.constexpr):
    """fp32 -> the nearest value of dtype DT, kept in fp32. bf16 goes through integer round-to-nearest-even,
    as torch rounds (the interpreter's float casts truncate); fp32 is unchanged."""
    if DT == tl.bfloat16:
        return (_bf16_rne_bits(v) << 16).to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    else:
        return v


@triton.jit
def _rms_norm_kernel(x_ptr, stride_x, r_ptr, stride_r, w_ptr, y_ptr, stride_y, s_ptr, stride_s, n, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the whole row stays in registers between the sum of squares and the scaling."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n
    x = tl.load(x_ptr + t * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    if HAS_RES:
        x = round_to(x + tl.load(r_ptr + t * stride_r + cols, mask=m, other=0.0).to(tl.float32), xdt)
        tl.store(s_ptr + t * stride_s + cols, x.to(xdt), mask=m)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    y = w * round_to(x * inv, xdt)
    tl.store(y_ptr + t * stride_y + cols, round_to(y, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [T, N] with unit column stride and weight [N]; got {tuple(x.shape)}, "
                         f"stride {x.stride()}, weight {tuple(weight.shape)}")
    t, n = x.shape
    y = out if out is not None else torch.empty((t, n), dtype=torch.promote_types(weight.dtype, x.dtype),
                                                device=x.device)
    s = None
    if residual is not None:
        if residual.shape != x.shape or residual.stride(1) != 1:
            raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)} with unit column stride")
        s = torch.empty_like(x, memory_format=torch.contiguous_format)
    if t == 0:
        return y, s
    block = triton.next_power_of_2(n)
    r = residual if residual is not None else x
    ss = s if s is not None else x
    _rms_norm_kernel[(t,)](x, x.stride(0), r, r.stride(0), weight, y, y.stride(0), ss, ss.stride(0), n, eps,
                           HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return y, s
