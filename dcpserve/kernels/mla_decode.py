"""Dense paged MLA decode (absorbed form), split-KV, returning the LSE.

Inputs:
  q            [B, Hq, kv_lora_rank + rope_dim] bf16/fp16/fp32: absorbed query (latent part, then rope part).
  cache        one layer's latent pool: [R, kv_lora_rank + rope_dim] bf16/fp16/fp32 rows, or (fp8) uint8
               [R, row_bytes] rows of the "656 B" LatentFormat (e4m3 values, fp32 scale per 128, bf16 rope).
  block_table  int32 [B, max_pages]; token j of sequence b lives at row
               block_table[b, j // page_size] * page_size + j % page_size.
  lens         int32 [B]: tokens of sequence b held in this pool (0 allowed).
Outputs: out fp32 [B, Hq, kv_lora_rank] = softmax(scale * q.k) @ v (v = first kv_lora_rank columns of a row),
         lse fp32 [B, Hq] natural-log sum-exp of the scaled scores; lens == 0 -> out 0, lse -inf.

Each sequence is cut into `num_splits` equal chunks of its *own* length (computed on the device, so the
launch needs no host sync and is CUDA-graph safe); each (head block, split, sequence) program runs an
online softmax over its chunk, and `merge_lse` combines the splits.

Performance model (why the tile is 64 heads x BLOCK_N keys, 8 warps): with 128 query heads one key costs
128 * 2 * (576 + 512) = 279 kFLOP against 1152 B (bf16) or 656 B (fp8) of cache, i.e. 242 / 424 FLOP/B,
above the ~200-300 FLOP/B ridge of an H100/H200 (bf16 tensor cores vs HBM). So at 128 heads this kernel
is compute-bound, not bandwidth-bound: a bf16 cache at 75% of copy bandwidth (~2.1 TB/s on H100) needs
~510 TFLOP/s of bf16 MMA, roughly what FlashMLA gets with hand-written CUDA. We expect Triton wgmma at
M=64 to land around 300-450 TFLOP/s, i.e. ~45-65% of copy bandwidth for bf16, and a lower GB/s for fp8
(same FLOPs, fewer bytes, plus in-register dequantization). The 64-head tile is read by both head-block
programs of a (split, sequence); they are launched back to back (head block = fastest grid axis) so the
second read is mostly an L2 hit.

Measured (H100 80GB HBM3, copy 3002 GB/s, triton 3.6; `python -m dcpserve.bench.kernels`): bf16 cache
240-262 TFLOP/s = 1000-1085 GB/s = 33-36% of copy bandwidth at batch >= 32 and ctx >= 32K; fp8 cache
210-225 TFLOP/s = 500-530 GB/s (17%). Below the estimate because Triton gives the QK^T dot of a 64-row
tile warpsPerCTA [8, 1] with 8 warps (its rule for a dot feeding another dot), so both warpgroups compute
the same 64 x BLOCK_N scores: 1.53x the useful MMA work, with small n32 wgmma instructions, and no overlap
of softmax with the MMAs (no warp specialization; 255 registers/thread leave room for one CTA per SM).
Tile tuning does not fix that (BLOCK_N 32/64/128 and 2-3 stages were tried, 64 x 2 stages is best), so
on Hopper with a bf16 or fp8 cache of the DeepSeek dims `mla_decode` runs `mla_decode_sm90` instead, a
Gluon kernel that places the layouts by hand (54-56% of copy bandwidth at 128 heads); this kernel serves
everything else (other GPUs, other dims, fp32 caches, the CPU interpreter).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dcpserve.kernels._common import (LOG2E, TileConfig, check_cache, check_latent_dims, choose_num_splits,
                                      default_tile, empty_result, fp8_block, interpreting, num_sms, attention_fp32,
                                      split_partials)
from dcpserve.kernels._mla_tile import attend_tile, finish_rows, load_latent_tile
from dcpserve.kernels.merge import merge_lse


@triton.jit(do_not_specialize=["n_heads", "num_splits", "stride_qb", "stride_bt", "stride_os", "stride_ob", "row_zero"],
            do_not_specialize_on_alignment=["row_zero"])
def _mla_decode_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
                       stride_qb, stride_qh, row_stride, stride_bt,
                       stride_os, stride_ob, stride_oh, stride_ls, stride_lb,
                       n_heads, num_splits, row_zero, sm_scale_log2,
                       PAGE: tl.constexpr, KV_LORA: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr,
                       QBLK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                       CDT: tl.constexpr, PREC: tl.constexpr, ALIGNED_ROWS: tl.constexpr):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(lens_ptr + pid_b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, seq_len)

    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = heads < n_heads
    d = tl.arange(0, KV_LORA)
    e = tl.arange(0, ROPE)
    q_row = q_ptr + pid_b * stride_qb + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + d[None, :], mask=hmask[:, None], other=0.0).to(CDT)
    q_pe = tl.load(q_row + KV_LORA + e[None, :], mask=hmask[:, None], other=0.0).to(CDT)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, KV_LORA], tl.float32)
    bt_row = bt_ptr + pid_b * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        page = tl.load(bt_row + offs // PAGE, mask=valid, other=0)
        rows = page.to(tl.int64) * PAGE + offs % PAGE
        if not ALIGNED_ROWS:
            # `+ row_zero` (always 0, opaque to the compiler): page * PAGE + offs % PAGE looks 16-aligned to
            # Triton's alignment analysis, and rows * row_stride keeps that claim even when rows are not
            # 16-byte aligned (fp8 rows of small models: 100, 260, 296 B), which gave misaligned 16-byte
            # loads on H100. Only there: on 16-byte aligned rows (656 B fp8, 1152 B bf16) the claim is true,
            # and the laundering cost ~4% of dense decode time on H100.
            rows = rows + row_zero
        k_lat, k_pe = load_latent_tile(cache_ptr, rows, valid, row_stride, KV_LORA, ROPE, FP8, QBLK, BLOCK_N, CDT)
        m_i, l_i, acc = attend_tile(q_lat, q_pe, k_lat, k_pe, valid[None, :], m_i, l_i, acc, sm_scale_log2, CDT, PREC)

    o_base = out_ptr + pid_s.to(tl.int64) * stride_os + pid_b * stride_ob
    l_base = lse_ptr + pid_s.to(tl.int64) * stride_ls + pid_b * stride_lb
    finish_rows(o_base + heads[:, None] * stride_oh + d[None, :], l_base + heads, hmask, m_i, l_i, acc)


def compute_dtype(q: torch.Tensor, cache: torch.Tensor, fp8: bool) -> tuple[tl.dtype, str]:
    """MMA operand dtype and dot precision. bf16 tensor cores for bf16/fp16/fp8 caches; exact fp32 when the
    cache itself is fp32 (tests, CPU parity) and always under the interpreter (its bf16 dot is broken)."""
    if interpreting() or (not fp8 and cache.dtype == torch.float32):
        return tl.float32, "ieee"
    if not fp8 and cache.dtype == torch.float16:
        return tl.float16, "tf32"
    return tl.bfloat16, "tf32"


@functools.lru_cache(maxsize=1)
def _sm90_module():
    try:
        from dcpserve.kernels import mla_decode_sm90
    except ImportError:  # a Triton without Gluon: the portable kernel serves
        return None
    return mla_decode_sm90


def sm90_kernel(q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int, rope_dim: int, fp8: bool):
    """The Hopper Gluon kernel module (`mla_decode_sm90`) where it applies to these inputs, else None."""
    if not q.is_cuda or interpreting():
        return None
    mod = _sm90_module()
    return mod if mod is not None and mod.supported(q, cache, kv_lora_rank, rope_dim, fp8) else None


def mla_decode(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
               page_size: int, scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool,
               num_splits: int | None = None, max_len: int | None = None,
               config: TileConfig | None = None,
               out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out fp32 [B, Hq, kv_lora_rank], lse fp32 [B, Hq]). `max_len` is an optional host-side
    upper bound of `lens` used only to pick `num_splits` (default: block-table capacity; no device sync).
    `out`: optional contiguous (out, lse) tensors of those shapes to write into.
    On Hopper with a bf16 or fp8 cache of the DeepSeek dims this runs the Gluon kernel of `mla_decode_sm90`
    (1.5-2.2x faster there for bf16); elsewhere, or when a `config` is given, the portable kernel."""
    check_latent_dims(kv_lora_rank, rope_dim)
    check_cache(cache, kv_lora_rank, rope_dim, fp8)
    b, n_heads, width = q.shape
    if width != kv_lora_rank + rope_dim or q.stride(2) != 1:
        raise ValueError(f"q must be [B, Hq, {kv_lora_rank + rope_dim}] with contiguous last dim")
    sm90 = sm90_kernel(q, cache, kv_lora_rank, rope_dim, fp8) if config is None else None
    cfg = config or default_tile(n_heads, fp8, fp32=not fp8 and cache.dtype == torch.float32)
    block_h, block_n = (sm90.block_h(n_heads), sm90.BLOCK_N.value) if sm90 else (cfg.block_h, cfg.block_n)
    head_blocks = triton.cdiv(n_heads, block_h)
    if num_splits is None:
        bound = max_len if max_len is not None else block_table.shape[1] * page_size
        num_splits = choose_num_splits(b, head_blocks, bound, block_n, num_sms(q.device))
    out, lse = out if out is not None else empty_result(b, n_heads, kv_lora_rank, q.device)
    if b == 0:
        return out, lse
    part_o, part_l = split_partials(out, lse, num_splits)
    if sm90:
        sm90.launch(q, cache, block_table, lens, part_o, part_l, page_size, scale, num_splits)
    else:
        cdt, prec = compute_dtype(q, cache, fp8)
        grid = (head_blocks, num_splits, b)
        _mla_decode_kernel[grid](
            q, cache, block_table, lens, part_o, part_l,
            q.stride(0), q.stride(1), cache.stride(0), block_table.stride(0),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
            n_heads, num_splits, 0, scale * LOG2E,
            PAGE=page_size, KV_LORA=kv_lora_rank, ROPE=rope_dim, FP8=fp8, QBLK=fp8_block(kv_lora_rank),
            BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, CDT=cdt, PREC=prec,
            ALIGNED_ROWS=cache.stride(0) * cache.element_size() % 16 == 0,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if num_splits > 1:
        merge_lse(part_o, part_l, out=out, lse_out=lse)
    return out, lse


def decode_rows(cache: torch.Tensor, rows: torch.Tensor, kv_lora_rank: int, rope_dim: int, fp8: bool) -> torch.Tensor:
    """Dequantized fp32 latent rows [n, kv_lora + rope] (the LatentFormat decoder, in fp32)."""
    from dcpserve.kv.formats import LatentFormat

    fmt = LatentFormat(kv_lora_rank, rope_dim, fp8, torch.float32)
    return fmt.decode(cache[rows.long()]).float()


def mla_decode_ref(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
                   page_size: int, scale: float, kv_lora_rank: int, rope_dim: int,
                   fp8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per sequence, gather its rows through the block table and attend in fp32."""
    b, n_heads, _ = q.shape
    out = torch.zeros(b, n_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((b, n_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(lens[i])
        if n == 0:
            continue
        j = torch.arange(n, device=q.device)
        rows = block_table[i, j // page_size].long() * page_size + j % page_size
        kv = decode_rows(cache, rows, kv_lora_rank, rope_dim, fp8)
        o, l = attention_fp32(q[i : i + 1], kv, kv_lora_rank, scale)
        out[i], lse[i] = o[0], l[0]
    return out, lse
