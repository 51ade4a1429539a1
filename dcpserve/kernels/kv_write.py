"""KV-cache writes with DCP ownership (DESIGN section 2, step 2), including fp8 quantization.

Launchers (all write in place, return None, never sync, so they are CUDA-graph safe):

  write_latent(cache, rows, kv, fp8, kv_lora_rank, rope_dim)
    cache: fp8 -> uint8 [R, LatentFormat.row_bytes] ("656 B": kv_lora_rank e4m3 bytes, one fp32 scale per
           block of min(128, kv_lora_rank) values, rope_dim bf16 values); else bf16/fp32 [R, kv_lora+rope]
    rows:  int32/int64 [T], local row of each new token; tokens this rank does not own point at the
           reserved dummy row (the cache's last row) and are written there (no filtering, no sync);
           the dummy row's bytes are then garbage (concurrent writers may interleave)
    kv:    bf16/fp32 [T, kv_lora_rank + rope_dim]
  write_index_keys(cache, rows, k, fp8)
    cache: fp8 -> uint8 [R, Di + 4] ("132 B": Di e4m3 bytes then one fp32 scale); else bf16/fp32 [R, Di]
    rows:  as above;  k: bf16/fp32 [T, Di]

The fp8 bytes are identical to `LatentFormat.encode` / `IndexKeyFormat.encode` run on CPU (so DCP=d writes
the same bytes as DCP=1): divisions use IEEE round-to-nearest (`div_rn`), and fp32->e4m3 / fp32->bf16 are
done in integer arithmetic with round-to-nearest-even (torch's rounding), which also sidesteps the
Triton interpreter's inexact float casts. NaN inputs are not supported (their bytes are unspecified).
Note: `formats.encode` itself run on CUDA divides by 448 through a reciprocal (torch does so for a Python
scalar divisor on CUDA), so its scales can differ by one ulp from the CPU result and from these kernels; the
torch references below divide by a same-device tensor and match the CPU bytes on every device.

`write_latent_ref` / `write_index_keys_ref` are the plain torch references.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
_FP8_MAX_C = tl.constexpr(FP8_MAX)  # kernels may only read constexpr globals
QBLOCK = 128
_FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _e4m3_rne_bits(v):
    """fp32 (|v| <= 448) -> e4m3fn bit pattern (int32 in [0, 255]), round-to-nearest-even like c10."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    # Normal e4m3 range (>= 2^-6): rebias the exponent and round the mantissa to 3 bits, ties to even.
    normal = (a + (-120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    # Subnormal range: count units of 2^-9, ties to even (shift clamped; larger shifts give 0 anyway).
    e = a >> 23
    mant = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    shift = tl.minimum(141 - tl.maximum(e, 1), 30)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up = (rem > half) | ((rem == half) & ((q & 1) == 1))
    sub = q + up.to(tl.int32)
    res = tl.where(a < (121 << 23), sub, normal)
    return res | (sign << 7)


@triton.jit
def _bf16_rne_bits(v):
    """fp32 -> bf16 bit pattern (int32 in [0, 65535]), round-to-nearest-even like c10 (NaN excluded)."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def _write_fp8_rows_kernel(x_ptr, stride_x, rows_ptr, cache_ptr, stride_c,
                           NQ: tl.constexpr, BLK: tl.constexpr, NS: tl.constexpr, TAIL: tl.constexpr,
                           NS_P2: tl.constexpr, BLK_P2: tl.constexpr, TAIL_P2: tl.constexpr):
    """One program per token: NQ values -> e4m3 in NS blocks of BLK (one fp32 scale each), then TAIL bf16."""
    t = tl.program_id(0)
    row = tl.load(rows_ptr + t).to(tl.int64)
    src = x_ptr + t.to(tl.int64) * stride_x
    dst = cache_ptr + row * stride_c

    s = tl.arange(0, NS_P2)[:, None]
    c = tl.arange(0, BLK_P2)[None, :]
    idx = s * BLK + c
    m = (s < NS) & (c < BLK) & (idx < NQ)
    v = tl.load(src + idx, mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(v), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-8), _FP8_MAX_C)  # IEEE division, as torch does on CPU
    qv = tl.math.div_rn(v, tl.broadcast_to(scale[:, None], (NS_P2, BLK_P2)))
    qv = tl.minimum(tl.maximum(qv, -_FP8_MAX_C), _FP8_MAX_C)
    tl.store(dst + idx, _e4m3_rne_bits(qv).to(tl.uint8), mask=m)

    # Scales as 4 little-endian bytes each: byte stores need no alignment of the row stride.
    sb = scale.to(tl.int32, bitcast=True)
    j = tl.arange(0, 4)[None, :]
    sbytes = (sb[:, None] >> (8 * j)) & 0xFF
    sv = tl.arange(0, NS_P2)[:, None]
    tl.store(dst + NQ + 4 * sv + j, sbytes.to(tl.uint8), mask=(sv < NS) & (j < 4))

    if TAIL > 0:
        r = tl.arange(0, TAIL_P2)
        rm = r < TAIL
        tv = tl.load(src + NQ + r, mask=rm, other=0.0).to(tl.float32)
        hb = _bf16_rne_bits(tv)
        base = dst + NQ + 4 * NS + 2 * r
        tl.store(base, (hb & 0xFF).to(tl.uint8), mask=rm)
        tl.store(base + 1, (hb >> 8).to(tl.uint8), mask=rm)


@triton.jit
def _write_plain_rows_kernel(x_ptr, stride_x, rows_ptr, cache_ptr, stride_c,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr):
    """One program per token: copy D values, rounding to bf16 (RNE, stored as int16 bits) or keeping fp32."""
    t = tl.program_id(0)
    row = tl.load(rows_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = d < D
    v = tl.load(x_ptr + t.to(tl.int64) * stride_x + d, mask=m, other=0.0).to(tl.float32)
    if OUT_BF16:
        tl.store(cache_ptr + row * stride_c + d, _bf16_rne_bits(v).to(tl.int16), mask=m)
    else:
        tl.store(cache_ptr + row * stride_c + d, v, mask=m)


# --------------------------------------------------------------------------------------------- launchers
def _check_rows(rows: torch.Tensor, x: torch.Tensor) -> None:
    if rows.dim() != 1 or rows.shape[0] != x.shape[0]:
        raise ValueError(f"rows {tuple(rows.shape)} must be [T] with T = {x.shape[0]}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32/int64, got {rows.dtype}")


def _write_fp8(cache: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, nq: int, blk: int, tail: int) -> None:
    ns = -(-nq // blk)
    if cache.dtype != torch.uint8 or cache.shape[1] != nq + 4 * ns + 2 * tail or cache.stride(1) != 1:
        raise ValueError(f"fp8 cache must be uint8 [R, {nq + 4 * ns + 2 * tail}] with unit column stride")
    if x.shape[1] != nq + tail:
        raise ValueError(f"input width {x.shape[1]} != {nq + tail}")
    _check_rows(rows, x)
    if x.shape[0] == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    _write_fp8_rows_kernel[(x.shape[0],)](
        x, x.stride(0), rows, cache, cache.stride(0),
        NQ=nq, BLK=blk, NS=ns, TAIL=tail,
        NS_P2=triton.next_power_of_2(ns), BLK_P2=triton.next_power_of_2(blk),
        TAIL_P2=triton.next_power_of_2(max(tail, 1)), num_warps=4)


def _write_plain(cache: torch.Tensor, rows: torch.Tensor, x: torch.Tensor) -> None:
    if cache.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"non-fp8 cache must be bf16 or fp32, got {cache.dtype}")
    if cache.shape[1] != x.shape[1] or cache.stride(1) != 1:
        raise ValueError(f"cache width {cache.shape[1]} != input width {x.shape[1]} (or non-unit stride)")
    _check_rows(rows, x)
    if x.shape[0] == 0:
        return
    x = x if x.stride(1) == 1 else x.contiguous()
    out_bf16 = cache.dtype == torch.bfloat16
    # bf16 is written as its int16 bit pattern so the rounding is ours (RNE), not the backend's.
    target = cache.view(torch.int16) if out_bf16 else cache
    d = x.shape[1]
    _write_plain_rows_kernel[(x.shape[0],)](
        x, x.stride(0), rows, target, cache.stride(0),
        D=d, BLOCK_D=triton.next_power_of_2(d), OUT_BF16=out_bf16, num_warps=4)


def write_latent(cache: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor, fp8: bool,
                 kv_lora_rank: int, rope_dim: int) -> None:
    """Write latent rows kv [T, kv_lora_rank + rope_dim] into cache[rows] (656 B format when fp8)."""
    if fp8:
        _write_fp8(cache, rows, kv, kv_lora_rank, min(QBLOCK, kv_lora_rank), rope_dim)
    else:
        if kv.shape[1] != kv_lora_rank + rope_dim:
            raise ValueError(f"kv width {kv.shape[1]} != {kv_lora_rank + rope_dim}")
        _write_plain(cache, rows, kv)


def write_index_keys(cache: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, fp8: bool) -> None:
    """Write indexer keys k [T, Di] into cache[rows] (132 B format when fp8: one scale per row)."""
    if fp8:
        _write_fp8(cache, rows, k, k.shape[1], k.shape[1], 0)
    else:
        _write_plain(cache, rows, k)


# ------------------------------------------------------------------------------------ torch references
def _quant_blocks_ref(x: torch.Tensor, blk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, n] -> (e4m3 bytes uint8 [T, n], fp32 scales [T, ceil(n/blk)]), per-block absmax scaling."""
    t, n = x.shape
    ns = -(-n // blk)
    blocks = torch.nn.functional.pad(x.float(), (0, ns * blk - n)).view(t, ns, blk)
    # A same-device tensor divisor keeps this an IEEE division on CUDA too (a Python scalar divisor makes
    # CUDA multiply by its reciprocal, which can differ by one ulp); filled on the device, not copied (no sync).
    scale = blocks.abs().amax(-1).clamp_min(1e-8) / torch.full((), FP8_MAX, device=x.device)
    q = (blocks / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(_FP8).view(t, -1)[:, :n]
    return q.view(torch.uint8), scale


def _encode_fp8_ref(x: torch.Tensor, nq: int, blk: int) -> torch.Tensor:
    q, scale = _quant_blocks_ref(x[:, :nq], blk)
    tail = x[:, nq:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return torch.cat([q, scale.contiguous().view(torch.uint8), tail], dim=1)


def write_latent_ref(cache: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor, fp8: bool,
                     kv_lora_rank: int, rope_dim: int) -> None:
    enc = _encode_fp8_ref(kv, kv_lora_rank, min(QBLOCK, kv_lora_rank)) if fp8 else kv.to(cache.dtype)
    cache[rows.long()] = enc  # duplicate (dummy) rows: any one of the writes wins


def write_index_keys_ref(cache: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, fp8: bool) -> None:
    enc = _encode_fp8_ref(k, k.shape[1], k.shape[1]) if fp8 else k.to(cache.dtype)
    cache[rows.long()] = enc
