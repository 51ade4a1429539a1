"""Linear layers over DeepSeek's block-fp8 weights, reading the e4m3 bytes directly (format: loader/fp8.py).

fp8_linear(x, q, scale, block) -> y [..., N] in x.dtype
  x      bf16/fp16/fp32 [..., K]
  q      e4m3 [N, K] (unit last stride)
  scale  fp32 [ceil(N / bn), ceil(K / bk)]  (the checkpoint's `weight_scale_inv`, block = (bn, bk))
  y = x @ (q * scale)^T, accumulated in fp32

Decode-sized inputs (M <= DEQUANT_MIN_M rows) run `_fp8_gemm_kernel`: each BLOCK_K step lies inside one
scale block, so it multiplies x by the raw e4m3 values (exact in bf16/fp16) and scales that partial product
by its block's scale, per output column. The weight streams at 1 byte per element, half of bf16's: a batch-1
decode step is bound by exactly these bytes. When the output columns alone give too few programs to keep
every SM streaming, K is split: partial sums [S, M, N] in fp32 are added in a fixed order (no atomics, so
results are run-to-run identical).

Larger inputs (prefill) are compute-bound: the weight is dequantized to x.dtype once (`dequant_fp8`, 3 bytes
of traffic per element against 2*M FLOP of math) and cuBLAS runs the product.

`fp8_linear_ref` is the torch reference: the weight dequantized to x.dtype, then `F.linear`; exactly what the
engine computed when it dequantized fp8 checkpoints at load. The GEMM path rounds differently (the weight is
never rounded to bf16; the sum runs in fp32), within bf16 rounding of the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from dcpserve.kernels._common import interpreting, num_sms
from dcpserve.kernels.rmsnorm import round_to
from dcpserve.loader.fp8 import dequantize_block

DEQUANT_MIN_M = 256  # rows above which dequantize + cuBLAS beats streaming e4m3 through the Triton GEMM


@dataclass(frozen=True)
class Fp8GemmConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _fp8_gemm_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                     stride_xm, stride_wn, stride_sn, stride_ym, stride_ys,
                     PER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     BLK_N: tl.constexpr, BLK_K: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """Rows [pid_m*BM, +BM) x columns [pid_n*BN, +BN) of y over K range [pid_s*PER, +PER)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_s * PER
    x_row = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
    s_col = s_ptr + (offs_n // BLK_N) * stride_sn
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i in range(0, PER, BK):  # the last split's steps past K load nothing
        k0 = k_lo + i
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(x_row + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_col + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(xdt)  # e4m3 values are exact in bf16 and fp16
        if IEEE:
            part = tl.dot(a, b, input_precision="ieee")
        else:
            part = tl.dot(a, b)
        s = tl.load(s_col + k0 // BLK_K, mask=n_ok & (k0 < K), other=0.0)
        acc += part * s[None, :]
    y_ptrs = y_ptr + pid_s.to(tl.int64) * stride_ys + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    ydt: tl.constexpr = y_ptr.dtype.element_ty
    tl.store(y_ptrs, round_to(acc, ydt).to(ydt), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, out_ptr, N, K, stride_qn, stride_sn, stride_on,
                    BN: tl.constexpr, BK: tl.constexpr, BLK_N: tl.constexpr, BLK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    q = tl.load(q_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :], mask=ok, other=0.0)
    s = tl.load(s_ptr + (offs_n // BLK_N)[:, None] * stride_sn + (offs_k // BLK_K)[None, :], mask=ok, other=0.0)
    odt: tl.constexpr = out_ptr.dtype.element_ty
    w = round_to(q.to(tl.float32) * s, odt)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w.to(odt), mask=ok)


def _check(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    n, k = q.shape
    bn, bk = block
    if q.dtype != torch.float8_e4m3fn or q.stride(-1) != 1:
        raise ValueError(f"weight must be e4m3 with a unit last stride, got {q.dtype} strides {q.stride()}")
    if tuple(scale.shape) != (triton.cdiv(n, bn), triton.cdiv(k, bk)) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be fp32 [{triton.cdiv(n, bn)}, {triton.cdiv(k, bk)}] for weight {n}x{k} "
                         f"and block {block}, got {scale.dtype} {tuple(scale.shape)}")


def dequant_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """q * scale rounded to `dtype` [N, K]; equals `loader.fp8.dequantize_block`."""
    _check(q, scale, block)
    n, k = q.shape
    out = torch.empty(n, k, dtype=dtype, device=q.device)
    bn_, bk_ = (16, 32) if interpreting() else (64, 128)
    _dequant_kernel[(triton.cdiv(n, bn_), triton.cdiv(k, bk_))](
        q, scale, out, n, k, q.stride(0), scale.stride(0), out.stride(0),
        BN=bn_, BK=bk_, BLK_N=block[0], BLK_K=block[1])
    return out


def default_config(m: int, n: int, k: int, block_k: int, device: torch.device, itemsize: int) -> Fp8GemmConfig:
    """BLOCK_M 16 is the smallest MMA tile (decode rows beyond M are masked). BLOCK_N 64 unless that leaves
    fewer than two programs per SM; then K is split into scale-block-aligned ranges until there are."""
    if interpreting():
        return Fp8GemmConfig(block_m=16, block_n=16, block_k=min(32, block_k), num_warps=1, num_stages=1)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bk = min(128 if itemsize <= 2 else 64, block_k)
    sms = num_sms(device)
    bn = 64
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    if tiles < 2 * sms and triton.cdiv(n, 32) * triton.cdiv(m, bm) >= sms:
        bn, tiles = 32, triton.cdiv(n, 32) * triton.cdiv(m, bm)
    k_blocks = triton.cdiv(k, block_k)
    split = max(1, min(k_blocks, triton.cdiv(2 * sms, tiles)))
    stages = 2 if itemsize > 2 else 4
    return Fp8GemmConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=stages)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               config: Fp8GemmConfig | None = None) -> torch.Tensor:
    """x @ (q * scale)^T in x.dtype (see the module docstring)."""
    _check(q, scale, block)
    n, k = q.shape
    lead = x.shape[:-1]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, n)
    if m > DEQUANT_MIN_M and config is None and not interpreting():
        return F.linear(x, dequant_fp8(q, scale, block, x.dtype))
    cfg = config or default_config(m, n, k, block[1], x.device, x.element_size())
    if block[1] % cfg.block_k:
        raise ValueError(f"BLOCK_K {cfg.block_k} must divide the scale block {block[1]}")
    k_blocks = triton.cdiv(k, block[1])
    per = triton.cdiv(k_blocks, cfg.split_k) * block[1]  # whole scale blocks per split
    split = triton.cdiv(k, per)
    interp = interpreting()
    dot_f32 = interp or x.dtype == torch.float32  # the interpreter multiplies bf16 tiles wrongly
    ieee = x.dtype == torch.float32 and not interp
    if split == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _fp8_gemm_kernel[grid](
        x2, q, scale, y, m, n, k,
        x2.stride(0), q.stride(0), scale.stride(0), y.stride(-2), y.stride(0) if split > 1 else 0,
        PER=per, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, BLK_N=block[0], BLK_K=block[1],
        DOT_F32=dot_f32, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        y = y.sum(0).to(x.dtype)
    return y.view(*lead, n)


def fp8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    return F.linear(x, dequantize_block(q, scale, block, x.dtype))
