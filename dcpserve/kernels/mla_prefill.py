"""Prefill / extend MLA attention in the absorbed (latent) form, varlen, dense-causal or sparse, with LSE.

Inputs:
  q         [T, H, kv_lora_rank + rope_dim] bf16/fp16/fp32: absorbed queries of the new tokens of B sequences,
            sequence i owning q[cu_q[i]:cu_q[i+1]].
  kv        [Ntot, kv_lora_rank + rope_dim] rows (or fp8 "656 B" uint8 rows): sequence i's context is
            kv[cu_k[i]:cu_k[i+1]], holding positions 0..ctx_len-1 in order.
  cu_q, cu_k int32 [B+1]; q_pos int32 [T]: position of each query; causal means key position <= q_pos.
  topk_pos  optional int32 [T, k]: context positions selected for each query (DSA), -1 padded, no
            duplicates; only those are attended (still causal, and positions >= ctx_len are ignored).
Outputs: out fp32 [T, H, kv_lora_rank], lse fp32 [T, H] (natural log); a query seeing no key gets 0 / -inf.

Dense tiles pack BLOCK_T consecutive query tokens x BLOCK_H heads into the MMA's M = 64 rows, so a TP
rank with only 16 heads still feeds full wgmma tiles; keys stop at the tile's largest q_pos (causal).
Sparse programs take one query token (its key set is its own) x BLOCK_H heads and walk its k entries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dcpserve.kernels._common import (LOG2E, TileConfig, attention_fp32, check_cache, check_latent_dims,
                                      fp8_block, interpreting, next_pow2)
from dcpserve.kernels._mla_tile import attend_tile, finish_rows, load_latent_tile
from dcpserve.kernels.mla_decode import compute_dtype, decode_rows


@triton.jit(do_not_specialize=["n_heads", "topk"])
def _mla_prefill_kernel(q_ptr, kv_ptr, cu_q_ptr, cu_k_ptr, qpos_ptr, topk_ptr, tok_seq_ptr, out_ptr, lse_ptr,
                        stride_qt, stride_qh, row_stride, stride_tk, stride_ot, stride_oh, stride_lt,
                        n_heads, topk, sm_scale_log2,
                        KV_LORA: tl.constexpr, ROPE: tl.constexpr, FP8: tl.constexpr, QBLK: tl.constexpr,
                        SPARSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_H
    r = tl.arange(0, BLOCK_M)
    heads = tl.program_id(0) * BLOCK_H + r % BLOCK_H
    if SPARSE:
        t0 = tl.program_id(1)
        seq = tl.load(tok_seq_ptr + t0)
        tok = t0 + r // BLOCK_H  # BLOCK_T == 1: every row is token t0
        row_ok = heads < n_heads
    else:
        seq = tl.program_id(2)
        q0 = tl.load(cu_q_ptr + seq)
        n_q = tl.load(cu_q_ptr + seq + 1) - q0
        tok_local = tl.program_id(1) * BLOCK_T + r // BLOCK_H
        tok = q0 + tok_local
        row_ok = (tok_local < n_q) & (heads < n_heads)
    k0 = tl.load(cu_k_ptr + seq)
    ctx = tl.load(cu_k_ptr + seq + 1) - k0
    qp = tl.load(qpos_ptr + tok, mask=row_ok, other=-1)
    tok64 = tok.to(tl.int64)

    d = tl.arange(0, KV_LORA)
    e = tl.arange(0, ROPE)
    q_row = q_ptr + tok64[:, None] * stride_qt + heads[:, None] * stride_qh
    q_lat = tl.load(q_row + d[None, :], mask=row_ok[:, None], other=0.0).to(CDT)
    q_pe = tl.load(q_row + KV_LORA + e[None, :], mask=row_ok[:, None], other=0.0).to(CDT)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, KV_LORA], tl.float32)
    if SPARSE:
        qp_t = tl.load(qpos_ptr + t0)
        sel_row = topk_ptr + t0.to(tl.int64) * stride_tk
        for j0 in range(0, topk, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            pos = tl.load(sel_row + j, mask=j < topk, other=-1)
            valid = (pos >= 0) & (pos < ctx) & (pos <= qp_t)
            rows = (k0 + tl.where(valid, pos, 0)).to(tl.int64)
            k_lat, k_pe = load_latent_tile(kv_ptr, rows, valid, row_stride, KV_LORA, ROPE, FP8, QBLK, BLOCK_N, CDT)
            m_i, l_i, acc = attend_tile(q_lat, q_pe, k_lat, k_pe, valid[None, :], m_i, l_i, acc,
                                        sm_scale_log2, CDT, PREC)
    else:
        hi = tl.minimum(ctx, tl.max(qp, 0) + 1)  # causal: no key beyond the tile's last query
        for n0 in range(0, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < hi
            rows = (k0 + pos).to(tl.int64)
            k_lat, k_pe = load_latent_tile(kv_ptr, rows, valid, row_stride, KV_LORA, ROPE, FP8, QBLK, BLOCK_N, CDT)
            mask = valid[None, :] & (pos[None, :] <= qp[:, None])
            m_i, l_i, acc = attend_tile(q_lat, q_pe, k_lat, k_pe, mask, m_i, l_i, acc, sm_scale_log2, CDT, PREC)

    o_ptrs = out_ptr + tok64[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    finish_rows(o_ptrs, lse_ptr + tok64 * stride_lt + heads, row_ok, m_i, l_i, acc)


def prefill_tile(n_heads: int, sparse: bool, fp32: bool = False, fp8: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_N, num_warps, num_stages). M = BLOCK_T * BLOCK_H rows per program."""
    if fp32 and not interpreting():  # fp32 operands: half the rows and keys so the tiles fit shared memory
        block_h = max(16, min(32, next_pow2(n_heads)))
        return (1 if sparse else max(1, 32 // block_h)), block_h, 16, 4, 1
    rows = 16 if interpreting() else 64
    block_h = min(rows, next_pow2(n_heads)) if not sparse else max(16, min(rows, next_pow2(n_heads)))
    if sparse and fp8:
        # With the fp8 dequantization in registers the 4-warp tile of fewer than 64 rows spills; the 64-row
        # tile with half its rows masked is 1.7x faster at 32 heads (H200, docs/PERF.md "prefill tile").
        block_h = rows
    block_t = 1 if sparse else max(1, rows // block_h)
    if interpreting():
        return block_t, block_h, 16, 4, 1
    # 64 keys per step: 1.26-1.44x the 32-key tile on H200 at every engine shape (32-128 heads, dense and
    # sparse, bf16 and fp8 caches; docs/PERF.md "prefill tile").
    return block_t, block_h, 64, 8 if block_t * block_h >= 64 else 4, 2


def mla_prefill(q: torch.Tensor, kv: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, q_pos: torch.Tensor,
                scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool = False,
                topk_pos: torch.Tensor | None = None, max_q_len: int | None = None,
                config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out fp32 [T, H, kv_lora_rank], lse fp32 [T, H]). The dense path's grid needs the longest
    query run: pass `max_q_len` to avoid a device sync (else it is read from cu_q). `config` overrides the
    tile's heads per program, keys per step, warps and stages; dense tiles take 64 // block_h tokens."""
    check_latent_dims(kv_lora_rank, rope_dim)
    check_cache(kv, kv_lora_rank, rope_dim, fp8)
    t, n_heads, width = q.shape
    if width != kv_lora_rank + rope_dim or q.stride(2) != 1:
        raise ValueError(f"q must be [T, H, {kv_lora_rank + rope_dim}] with contiguous last dim")
    sparse = topk_pos is not None
    out = torch.empty(t, n_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, n_heads, dtype=torch.float32, device=q.device)
    n_seq = cu_q.shape[0] - 1
    if t == 0 or n_seq == 0:
        return out, lse
    block_t, block_h, block_n, warps, stages = prefill_tile(n_heads, sparse, fp32=not fp8 and kv.dtype == torch.float32,
                                                           fp8=fp8)
    if config is not None:
        block_h, block_n, warps, stages = config.block_h, config.block_n, config.num_warps, config.num_stages
        block_t = 1 if sparse else max(1, (16 if interpreting() else 64) // block_h)
    head_blocks = triton.cdiv(n_heads, block_h)
    cdt, prec = compute_dtype(q, kv, fp8)
    if sparse:
        if topk_pos.dim() != 2 or topk_pos.shape[0] != t or topk_pos.stride(1) != 1:
            raise ValueError("topk_pos must be [T, k] with contiguous last dim")
        tok_seq = torch.searchsorted(cu_q[1:].contiguous(), torch.arange(t, device=q.device, dtype=cu_q.dtype),
                                     right=True).to(torch.int32)
        grid = (head_blocks, t)
        sel, k, stride_tk = topk_pos, topk_pos.shape[1], topk_pos.stride(0)
    else:
        if max_q_len is None:
            max_q_len = int((cu_q[1:] - cu_q[:-1]).max())
        grid = (head_blocks, triton.cdiv(max(max_q_len, 1), block_t), n_seq)
        tok_seq, sel, k, stride_tk = cu_q, cu_q, 0, 0  # unused placeholders in the dense path
    _mla_prefill_kernel[grid](
        q, kv, cu_q, cu_k, q_pos, sel, tok_seq, out, lse,
        q.stride(0), q.stride(1), kv.stride(0), stride_tk, out.stride(0), out.stride(1), lse.stride(0),
        n_heads, k, scale * LOG2E,
        KV_LORA=kv_lora_rank, ROPE=rope_dim, FP8=fp8, QBLK=fp8_block(kv_lora_rank), SPARSE=sparse,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_N=block_n, CDT=cdt, PREC=prec,
        num_warps=warps, num_stages=stages)
    return out, lse


def mla_prefill_ref(q: torch.Tensor, kv: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, q_pos: torch.Tensor,
                    scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool = False,
                    topk_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per sequence, a [n_q, ctx] mask (causal on positions, AND selected when sparse)."""
    t, n_heads, _ = q.shape
    out = torch.zeros(t, n_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((t, n_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(cu_q.shape[0] - 1):
        qa, qb, ka, kb = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qb == qa:
            continue
        ctx = kb - ka
        rows = decode_rows(kv, torch.arange(ka, kb, device=kv.device), kv_lora_rank, rope_dim, fp8)
        pos = torch.arange(ctx, device=q.device)
        mask = pos[None, :] <= q_pos[qa:qb, None].long()
        if topk_pos is not None:
            sel = topk_pos[qa:qb].long()
            chosen = torch.zeros(qb - qa, ctx + 1, dtype=torch.bool, device=q.device)
            ok = (sel >= 0) & (sel < ctx)
            chosen.scatter_(1, torch.where(ok, sel, torch.full_like(sel, ctx)), True)  # column ctx = discard
            mask &= chosen[:, :ctx]
        o, l = attention_fp32(q[qa:qb], rows, kv_lora_rank, scale, mask)
        out[qa:qb], lse[qa:qb] = o, l
    return out, lse
