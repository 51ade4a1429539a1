"""Sparse MLA decode (DSA) over compacted local row lists, returning the LSE.

Inputs:
  q       [B, Hq, kv_lora_rank + rope_dim] bf16/fp16/fp32 absorbed query (latent part, then rope part).
  cache   one layer's latent pool, as in `mla_decode` (bf16/fp16/fp32 rows or fp8 "656 B" uint8 rows).
  rows    int32 [B, kmax]: pool rows of the keys selected for query b that this rank owns, compacted to the
          front; only rows[b, :counts[b]] are valid. Entries past the count (garbage, -1, ...) are never read.
  counts  int32 [B].
Outputs: out fp32 [B, Hq, kv_lora_rank], lse fp32 [B, Hq] (natural log); counts == 0 -> out 0, lse -inf.

Work is proportional to counts[b], not kmax: every program's loop bound comes from the count (DCP hands
each rank about k/d rows; padding to k would multiply the attention work by d). As in `mla_decode` the
count may be split over `num_splits` programs (equal shares of each query's own count, device-computed),
combined by `merge_lse`.

Performance model: at batch 128, 128 heads, k = 2048 this is 128*128*2048*2*(576+512) = 73 GFLOP over
302 MB (bf16) / 172 MB (fp8) of gathered rows: ~240 / 420 FLOP/B, firmly compute-bound on H100/H200, like
dense decode at 128 heads. So on Hopper, for a bf16 or fp8 cache of the DeepSeek dims, this hands the work
to the dense Gluon kernel (`mla_decode_sm90`) with the row list as a block table of one-row pages: the same
hand-placed wgmma tile, each key's row id loaded a tile ahead, entries past the count never loaded.
Measured (1x H200, `python -m dcpserve.bench.kernels --sparse-only`, docs/PERF.md section 2), batch 128,
128 heads: k = 2048 0.409 -> 0.212 ms (178 -> 345 TFLOP/s) bf16, 0.445 -> 0.262 ms (164 -> 279) fp8;
k = 512 (a DCP4 rank) 0.125 -> 0.073 ms bf16. Predicted from the dense kernel's ~390 TFLOP/s: 0.19 ms;
the rest is the per-key row gather (no contiguous pages) and shorter loops. The Triton kernel below
serves every other case (other GPUs and dims, fp32 caches, the CPU interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcpserve.kernels._common import (LOG2E, TileConfig, attention_fp32, check_cache, check_latent_dims,
                                      choose_num_splits, fp8_block, num_sms)
from dcpserve.kernels._mla_tile import attend_tile, finish_rows, load_latent_tile
from dcpserve.kernels.mla_decode import choose_kernel, compute_dtype, decode_rows, run_splits


@triton.jit(do_not_specialize=["n_heads", "num_splits", "stride_qb", "stride_rb", "stride_os", "stride_ob"])
def _mla_sparse_decode_kernel(q_ptr, cache_ptr, rows_ptr, counts_ptr, out_ptr, lse_ptr,
                              stride_qb, stride_qh, row_stride, stride_rb,
                              stride_os, stride_ob, stride_oh, stride_ls, stride_lb,
                              n_heads, num_splits, sm_scale_log2,
                              KV_LORA: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr, QBLK: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr):
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    count = tl.load(counts_ptr + pid_b)
    chunk = tl.cdiv(tl.cdiv(count, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = tl.minimum(start + chunk, count)

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
    idx_row = rows_ptr + pid_b * stride_rb
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        valid = j < end  # never touch rows[b, count:]
        rows = tl.load(idx_row + j, mask=valid, other=0).to(tl.int64)
        k_lat, k_pe = load_latent_tile(cache_ptr, rows, valid, row_stride, KV_LORA, ROPE, FP8, QBLK, BLOCK_N, CDT)
        m_i, l_i, acc = attend_tile(q_lat, q_pe, k_lat, k_pe, valid[None, :], m_i, l_i, acc, sm_scale_log2, CDT, PREC)

    o_base = out_ptr + pid_s.to(tl.int64) * stride_os + pid_b * stride_ob
    l_base = lse_ptr + pid_s.to(tl.int64) * stride_ls + pid_b * stride_lb
    finish_rows(o_base + heads[:, None] * stride_oh + d[None, :], l_base + heads, hmask, m_i, l_i, acc)


def mla_sparse_decode(q: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool,
                      num_splits: int | None = None, config: TileConfig | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out fp32 [B, Hq, kv_lora_rank], lse fp32 [B, Hq]). num_splits defaults to a choice from B
    and kmax (= rows.shape[1], a static bound, so no device sync). `out`: optional contiguous (out, lse)
    tensors of those shapes to write into. On Hopper with a bf16 or fp8 cache of the DeepSeek dims this runs
    the Gluon kernel of `mla_decode_sm90` (1.5-2x faster there); elsewhere, or when a `config` is given, the
    Triton kernel above."""
    check_latent_dims(kv_lora_rank, rope_dim)
    check_cache(cache, kv_lora_rank, rope_dim, fp8)
    b, n_heads, width = q.shape
    if width != kv_lora_rank + rope_dim or q.stride(2) != 1:
        raise ValueError(f"q must be [B, Hq, {kv_lora_rank + rope_dim}] with contiguous last dim")
    if rows.dim() != 2 or rows.shape[0] != b or rows.stride(1) != 1:
        raise ValueError("rows must be [B, kmax] with contiguous last dim")
    sm90, cfg, block_h, block_n = choose_kernel(q, cache, kv_lora_rank, rope_dim, fp8, config)
    head_blocks = triton.cdiv(n_heads, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(b, head_blocks, rows.shape[1], block_n, num_sms(q.device))

    def launch(part_o: torch.Tensor, part_l: torch.Tensor) -> None:
        if sm90:
            # A row list is a block table of one-row pages: at page size 1 the Hopper dense kernel gathers
            # exactly rows[b, :counts[b]] (split the same way, entries past the count never loaded).
            sm90.launch(q, cache, rows, counts, part_o, part_l, 1, scale, num_splits)
            return
        cdt, prec = compute_dtype(q, cache, fp8)
        _mla_sparse_decode_kernel[(head_blocks, num_splits, b)](
            q, cache, rows, counts, part_o, part_l,
            q.stride(0), q.stride(1), cache.stride(0), rows.stride(0),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
            n_heads, num_splits, scale * LOG2E,
            KV_LORA=kv_lora_rank, ROPE=rope_dim, FP8=fp8, QBLK=fp8_block(kv_lora_rank),
            BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, CDT=cdt, PREC=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    return run_splits(q, kv_lora_rank, num_splits, out, launch)


def mla_sparse_decode_ref(q: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                          scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per query, dequantize its first counts[b] rows and attend in fp32."""
    b, n_heads, _ = q.shape
    out = torch.zeros(b, n_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((b, n_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(counts[i])
        if n == 0:
            continue
        kv = decode_rows(cache, rows[i, :n], kv_lora_rank, rope_dim, fp8)
        o, l = attention_fp32(q[i : i + 1], kv, kv_lora_rank, scale)
        out[i], lse[i] = o[0], l[0]
    return out, lse
