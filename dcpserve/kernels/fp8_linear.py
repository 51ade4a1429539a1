"""Linear layers over DeepSeek's block-fp8 weights, reading the e4m3 bytes directly (format: loader/fp8.py).

fp8_linear(x, q, scale, block) -> y [..., N] in x.dtype
  x      bf16/fp16/fp32 [..., K]
  q      e4m3 [N, K] (unit last stride)
  scale  fp32 [ceil(N / bn), ceil(K / bk)]  (the checkpoint's `weight_scale_inv`, block = (bn, bk))
  y = x @ (q * scale)^T, accumulated in fp32

The weight streams at 1 byte per element, half of bf16's: a batch-1 decode step is bound by exactly these
bytes. One input row (batch-1 decode) runs `_fp8_gemv_kernel` on the CUDA cores: per step, 256 contiguous
bytes of each of 16-32 weight rows, converted to fp32, multiplied by x, summed per scale block and scaled.
Other decode-sized inputs (M <= DEQUANT_MIN_M rows) run `_fp8_gemm_kernel`: each BLOCK_K step lies inside
one scale block; its e4m3 tile is dequantized in registers (rounded to x's dtype, the reference's weights
exactly) and fed to the tensor cores as the first operand of y^T = W x^T. When the output columns alone give
too few programs to keep every SM streaming, K is split: partial sums [S, M, N] in fp32 are added in a
fixed order (no atomics, so results are run-to-run identical).

Larger inputs (prefill) are compute-bound: the weight is dequantized to x.dtype once (`dequant_fp8`, 3 bytes
of traffic per element against 2*M FLOP of math) and cuBLAS runs the product.

`fp8_linear_ref` is the torch reference: the weight dequantized to x.dtype, then `F.linear`; exactly what the
engine computed when it dequantized fp8 checkpoints at load. The GEMM kernel uses those same rounded weights;
the GEMV never rounds them. Both sum in fp32 in their own order.
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

DEQUANT_MIN_M = 128  # rows above which dequantize + cuBLAS beats the Triton GEMM (H200, M = 256: 192-217 vs 225-280 us)


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
    """Columns [pid_n*BN, +BN) x rows [pid_m*BM, +BM) of y over K range [pid_s*PER, +PER), computed transposed:
    y^T = W x^T, so the dequantized weight tile is the MMA's first operand and goes to the tensor cores straight
    from registers (as the second operand it was written back to shared memory first: 1.3-1.7x slower at
    M = 32-128 on H200)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_s * PER
    w_row = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_col = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm
    s_row = s_ptr + (offs_n // BLK_N) * stride_sn
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for i in range(0, PER, BK):  # the last split's steps past K load nothing
        k0 = k_lo + i
        kk = k0 + offs_k
        k_ok = kk < K
        s = tl.load(s_row + k0 // BLK_K, mask=n_ok & (k0 < K), other=0.0)
        w = tl.load(w_row + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_col + kk[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        # Dequantized in registers and rounded to x's dtype exactly as the reference rounds its weights; the
        # MMA accumulates in place (scaling each step's partial product instead made every step wait on it).
        w = w.to(tl.float32) * s[:, None]
        if DOT_F32:
            xt = xt.to(tl.float32)
        else:
            w = w.to(xdt)
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    y_ptrs = y_ptr + pid_s.to(tl.int64) * stride_ys + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    ydt: tl.constexpr = y_ptr.dtype.element_ty
    tl.store(y_ptrs, round_to(acc, ydt).to(ydt), mask=m_ok[None, :] & n_ok[:, None])


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, stride_sn, stride_ys,
                     PER: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLK_K: tl.constexpr, BLK_N: tl.constexpr):
    """One input row (batch-1 decode): y[cols] over K range [pid_s*PER, +PER), on the CUDA cores. Each step reads
    BK (several scale blocks) contiguous bytes of each of BN weight rows; partial sums per scale block are
    scaled, then added."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    NB: tl.constexpr = BK // BLK_K
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    n_ok = offs_n < N
    k_lo = pid_s * PER
    w_row = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    s_row = s_ptr + (offs_n // BLK_N) * stride_sn
    acc = tl.zeros([BN], dtype=tl.float32)
    for i in range(0, PER, BK):
        k0 = k_lo + i
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_row + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        part = tl.sum(tl.reshape(w * x[None, :], (BN, NB, BLK_K)), axis=2)
        sb = k0 // BLK_K + tl.arange(0, NB)
        s = tl.load(s_row[:, None] + sb[None, :], mask=n_ok[:, None] & (sb * BLK_K < K)[None, :], other=0.0)
        acc += tl.sum(part * s, axis=1)
    ydt: tl.constexpr = y_ptr.dtype.element_ty
    tl.store(y_ptr + pid_s.to(tl.int64) * stride_ys + offs_n, round_to(acc, ydt).to(ydt), mask=n_ok)


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
    """M = 1: the GEMV kernel (block_m 1), 256 contiguous bytes per weight row per step (128-byte steps left
    DRAM at ~2 TB/s on H200; 256 reached 2.7-3.4 TB/s), 16-32 rows per program. Otherwise the (transposed)
    MMA kernel with 64 weight rows per program and BLOCK_M 16/32/64/128 input rows (the best of sweeps on H200,
    docs/perf/fp8_gemm_swap_h200.json and, for 128, docs/perf/fp8_gemm_bm128_h200.json: 3-11% faster than two
    64-row programs at M = 128). Either way K is split into scale-block-aligned ranges until there are about two
    programs per SM."""
    if interpreting():
        return Fp8GemmConfig(block_m=1 if m == 1 else 16, block_n=16, block_k=block_k if m == 1 else min(32, block_k),
                             num_warps=1, num_stages=1)
    sms = num_sms(device)
    k_blocks = triton.cdiv(k, block_k)
    if m == 1:
        bk = block_k * max(1, 256 // block_k)
        bn = 16 if triton.cdiv(n, 16) >= 4 * sms else 32
        split = max(1, min(k_blocks, triton.cdiv(2 * sms, triton.cdiv(n, bn))))
        return Fp8GemmConfig(block_m=1, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4)
    bm = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    bk = min(128 if itemsize <= 2 else 64, block_k)
    tiles = triton.cdiv(n, 64) * triton.cdiv(m, bm)
    split = max(1, min(k_blocks, triton.cdiv(2 * sms, tiles)))
    return Fp8GemmConfig(block_m=bm, block_n=64, block_k=bk, split_k=split, num_warps=4,
                         num_stages=2 if itemsize > 2 else 3)


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
    gemv = cfg.block_m == 1
    if (cfg.block_k % block[1]) if gemv else (block[1] % cfg.block_k):
        raise ValueError(f"BLOCK_K {cfg.block_k} must {'be a multiple of' if gemv else 'divide'} the scale block {block[1]}")
    if gemv and m != 1:
        raise ValueError("block_m 1 (the GEMV kernel) takes one input row")
    step = max(cfg.block_k, block[1])
    per = triton.cdiv(triton.cdiv(k, step), cfg.split_k) * step  # whole steps (and scale blocks) per split
    split = triton.cdiv(k, per)
    interp = interpreting()
    dot_f32 = interp or x.dtype == torch.float32  # the interpreter multiplies bf16 tiles wrongly
    ieee = x.dtype == torch.float32 and not interp
    if split == 1:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    if gemv:
        _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
            x2, q, scale, y, n, k, q.stride(0), scale.stride(0), y.stride(0) if split > 1 else 0,
            PER=per, BN=cfg.block_n, BK=cfg.block_k, BLK_K=block[1], BLK_N=block[0],
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return (y.sum(0).to(x.dtype) if split > 1 else y).view(*lead, n)
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
