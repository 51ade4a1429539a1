"""DSA lightning-indexer scoring over a paged key cache, and the compaction of the selected rows.

indexer_scores(q, w, cache, block_table, lens, page_size, scale, fp8, max_len=None) -> fp32 [B, max_len]
  q:           bf16/fp32 [B, Hi, Di]   (one query token per sequence: decode)
  w:           fp32 [B, Hi]            (weights_proj output, already including the Hi^-0.5 factor)
  cache:       fp8 -> uint8 [R, Di + 4] (IndexKeyFormat "132 B": Di e4m3 bytes then one fp32 scale);
               else bf16/fp32 [R, Di]
  block_table: int32/int64 [B, P]; token j of sequence b lives at row
               block_table[b, j // page_size] * page_size + j % page_size
  lens:        int32/int64 [B], number of tokens of each sequence in this cache (0 allowed)
  max_len:     output width; default lens.max() (a host sync: pass it under CUDA graphs)
  score[b, j] = sum_h w[b, h] * relu(scale * q[b, h] . k_j), and -inf for j >= lens[b].
  Hi and Di must be powers of two >= 16, Di >= 64 for fp8 (tensor-core tile sizes); real: Hi 64, Di 128.

indexer_scores(..., keys=(I, d, rank)) -> int64 [B, max_len]
  The same scores fused with the decode top-k's key packing (`dcpserve.attention.topk.pack_keys`): each entry
  is the packed key of (score, global position of local token j), so the scores never exist as floats and
  a plain `torch.topk` over the keys is the ordered top-k.

compact_owned(keys, block_table, I, d, rank, page_size) -> (rows int32 [B, K], counts int32 [B])
  After the (distributed) top-k: this rank's selected tokens as local cache rows, compacted to the front.

`indexer_scores_ref` / `indexer_keys_ref` are the plain torch references;
`compact_owned`'s is `dcpserve.attention.indexer.compact_owned`.

Measured (H200, bf16 q, fp8 cache, `python -m dcpserve.bench.kernels_misc --section indexer`, 2026-11-28):
swap_ab=False writes the converted bf16 keys back to shared memory with 2-byte stores before every MMA and
reached only ~250 GB/s at batch 128 x 128K (about 5% of HBM bandwidth). swap_ab=True (the default now) puts
the keys in the MMA's register operand instead (s = k @ q^T): with 128-key tiles and 4 warps, batch 32 x 32K
took 153 us against 652 (4.3x) and batch 1 x 128K 28.9 us against 173 (6x); results equal to ~2e-7
relative (summation order).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from dcpserve.attention.topk import EMPTY_KEY, pack_keys
_FP8 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------------------------ scoring
@triton.jit
def _score_tile(q0, q1, q2, q3, w, k_ptr, ks_ptr, bt_row_ptr, out_row, tile, L, n,
                stride_kr, stride_ksr, page_size, max_len, scale, pos_i, pos_d, pos_r, empty_key,
                DI: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr,
                SWAP: tl.constexpr, KEYS: tl.constexpr):
    """Scores BLOCK_N tokens of one sequence and stores them; -inf past L. KEYS: stores the packed top-k key
    of (score, global position) instead (`pack_keys`; position of local token j from the DCP layout
    (j // I) * I * d + r * I + j % I), `empty_key` past L.

    fp8 rows are 132 B, so rows are only 4-byte aligned: keys are read as int32 words (4 e4m3 values each)
    and the dot product is split into 4 dots over the byte planes (q0..q3 hold q's dims c, c+4, c+8, ...);
    the sum over dims does not care about their order. Non-fp8 keys use q0 (all of q) and one dot.
    Keys convert exactly to the query operand type (bf16 for tensor cores, or fp32).
    SWAP=False: s[h, j] = q @ k^T; the converted keys are written back to shared memory for the MMA.
    SWAP=True:  s[j, h] = k @ q^T (q0..q3 given transposed); the keys go from shared memory straight into
    the MMA's register operand, with no second trip through shared memory.
    Written without helper calls: each nested call costs milliseconds in Triton's interpreter."""
    j = tile * BLOCK_N + n
    valid = j < L
    page = tl.load(bt_row_ptr + j // page_size, mask=valid, other=0)
    row = page.to(tl.int64) * page_size + j % page_size
    if FP8:
        wd = tl.arange(0, DI // 4)
        words = tl.load(k_ptr + row[:, None] * stride_kr + wd[None, :], mask=valid[:, None], other=0)
        k0 = (words & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(q0.dtype)
        k1 = ((words >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(q0.dtype)
        k2 = ((words >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(q0.dtype)
        k3 = ((words >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(q0.dtype)
        ks = tl.load(ks_ptr + row * stride_ksr, mask=valid, other=0.0)
        if SWAP:
            s = tl.dot(k0, q0, input_precision=PREC)  # [BLOCK_N, HI]
            s = tl.dot(k1, q1, s, input_precision=PREC)
            s = tl.dot(k2, q2, s, input_precision=PREC)
            s = tl.dot(k3, q3, s, input_precision=PREC)
            s = s * ks[:, None]
        else:
            s = tl.dot(q0, tl.trans(k0), input_precision=PREC)  # [HI, BLOCK_N]
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PREC)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PREC)
            s = tl.dot(q3, tl.trans(k3), s, input_precision=PREC)
            s = s * ks[None, :]
    else:
        d = tl.arange(0, DI)
        k = tl.load(k_ptr + row[:, None] * stride_kr + d[None, :], mask=valid[:, None], other=0)
        if SWAP:
            s = tl.dot(k.to(q0.dtype), q0, input_precision=PREC)
        else:
            s = tl.dot(q0, tl.trans(k.to(q0.dtype)), input_precision=PREC)
    s = tl.maximum(s * scale, 0.0)
    if SWAP:
        score = tl.sum(s * w[None, :], axis=1)
    else:
        score = tl.sum(s * w[:, None], axis=0)
    if KEYS:
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0
        score = tl.where(score != score, float("nan"), score)  # one NaN bit pattern
        bits = score.to(tl.int32, bitcast=True)
        mono = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        j64 = j.to(tl.int64)
        pos = (j64 // pos_i) * (pos_i * pos_d) + pos_r * pos_i + j64 % pos_i
        key = (mono << 32) | (4294967295 - pos)
        tl.store(out_row + j, tl.where(valid, key, empty_key), mask=j < max_len)
    else:
        tl.store(out_row + j, tl.where(valid, score, float("-inf")), mask=j < max_len)


# page_size is not specialized: with it known divisible by 16, Triton's alignment analysis takes
# `(page * page_size + j % page_size) * 33` (a 132 B row in int32 words) for 16-byte aligned and emits 16-byte
# cp.async copies, which fault ("misaligned address") on real rows. Unspecialized, every copy is 4 bytes.
@triton.jit(do_not_specialize=["page_size"])
def _indexer_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, bt_ptr, lens_ptr, out_ptr,
                    stride_qb, stride_qh, stride_wb, stride_kr, stride_ksr, stride_btb, stride_ob,
                    page_size, max_len, scale, pos_i, pos_d, pos_r, empty_key,
                    HI: tl.constexpr, DI: tl.constexpr, BLOCK_N: tl.constexpr, TPP: tl.constexpr,
                    FP8: tl.constexpr, QT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
                    SWAP: tl.constexpr, KEYS: tl.constexpr):
    """Program (b, c) scores tiles [c*TPP, (c+1)*TPP) of BLOCK_N tokens of sequence b,
    so q[b] is loaded once per several tiles rather than once per tile."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    L = tl.load(lens_ptr + b)
    h = tl.arange(0, HI)
    q_base = q_ptr + b.to(tl.int64) * stride_qb
    # Query operand(s): [HI, dims] for SWAP=False, transposed [dims, HI] for SWAP=True.
    if SWAP:
        q_row = q_base + h[None, :] * stride_qh
        if FP8:
            wq = 4 * tl.arange(0, DI // 4)[:, None]
        else:
            wq = tl.arange(0, DI)[:, None]
    else:
        q_row = q_base + h[:, None] * stride_qh
        if FP8:
            wq = 4 * tl.arange(0, DI // 4)[None, :]
        else:
            wq = tl.arange(0, DI)[None, :]
    q0 = tl.load(q_row + wq).to(QT)
    if FP8:
        q1 = tl.load(q_row + wq + 1).to(QT)
        q2 = tl.load(q_row + wq + 2).to(QT)
        q3 = tl.load(q_row + wq + 3).to(QT)
    else:
        q1 = q0
        q2 = q0
        q3 = q0
    w = tl.load(w_ptr + b.to(tl.int64) * stride_wb + h).to(tl.float32)
    n = tl.arange(0, BLOCK_N)
    out_row = out_ptr + b.to(tl.int64) * stride_ob
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    first = c * TPP
    if INTERP:
        # The interpreter cannot loop to a loaded bound; masking alone gives the same result.
        for t in range(0, TPP):
            _score_tile(q0, q1, q2, q3, w, k_ptr, ks_ptr, bt_row, out_row, first + t, L, n, stride_kr,
                        stride_ksr, page_size, max_len, scale, pos_i, pos_d, pos_r, empty_key,
                        DI, BLOCK_N, FP8, PREC, SWAP, KEYS)
    else:
        # Tiles holding tokens (< lens[b]) are scored, the others only get -inf: two branch-free loops
        # (rather than an `if` per tile) keep the key loads software-pipelined.
        n_live = tl.minimum(tl.maximum(tl.cdiv(L, BLOCK_N) - first, 0), TPP)
        for t in range(0, n_live):
            _score_tile(q0, q1, q2, q3, w, k_ptr, ks_ptr, bt_row, out_row, first + t, L, n, stride_kr,
                        stride_ksr, page_size, max_len, scale, pos_i, pos_d, pos_r, empty_key,
                        DI, BLOCK_N, FP8, PREC, SWAP, KEYS)
        for t in range(n_live, TPP):
            j = (first + t) * BLOCK_N + n
            if KEYS:
                tl.store(out_row + j, tl.full([BLOCK_N], 0, tl.int64) + empty_key, mask=j < max_len)
            else:
                tl.store(out_row + j, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=j < max_len)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _tiles_per_prog(batch: int, n_tiles: int, device: torch.device) -> int:
    # Enough programs for ~8 waves of SMs; beyond that, longer programs amortize the q load. A power of
    # two (it is a compile-time constant) so only a few variants are ever compiled.
    want_progs = 8 * _num_sms(device)
    return min(32, 1 << max(0, ((batch * n_tiles) // want_progs).bit_length() - 1))


def indexer_scores(q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                   lens: torch.Tensor, page_size: int, scale: float, fp8: bool,
                   max_len: int | None = None, block_n: int = 128, num_warps: int = 4,
                   num_stages: int = 3, tiles_per_prog: int | None = None,
                   swap_ab: bool = True, keys: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Indexer scores fp32 [B, max_len] (see module docstring). block_n / num_warps / num_stages /
    tiles_per_prog / swap_ab are tuning knobs (swap_ab: keys as the MMA's register operand, see _score_tile).

    keys=(interleave, dcp, rank): return the packed top-k keys int64 [B, max_len] instead, equal to
    `pack_keys(scores, positions)` with local token j at global position (j // I) * I * d + rank * I + j % I
    and EMPTY_KEY past lens[b] (`indexer_keys_ref`). (1, 1, 0) maps j to itself (a replicated cache)."""
    bsz, hi, di = q.shape
    if hi < 16 or di < (64 if fp8 else 16) or hi & (hi - 1) or di & (di - 1):
        raise ValueError(f"Hi={hi} and Di={di} must be powers of two >= 16 (Di >= 64 with an fp8 cache)")
    if w.shape != (bsz, hi):
        raise ValueError(f"w {tuple(w.shape)} must be [B, Hi] = {(bsz, hi)}")
    if max_len is None:
        max_len = int(lens.max().item()) if bsz else 0
    out = torch.empty(bsz, max_len, dtype=torch.int64 if keys is not None else torch.float32, device=q.device)
    if bsz == 0 or max_len == 0:
        return out
    pos_i, pos_d, pos_r = keys or (1, 1, 0)
    if fp8:
        if cache.dtype != torch.uint8 or cache.shape[1] != di + 4 or di % 4 or cache.stride(0) % 4:
            raise ValueError(f"fp8 index cache must be uint8 [R, {di + 4}]")
        # Rows are 4-byte aligned (132 B): int32 words for the keys, the fp32 view for the scale column.
        kdata, kscale = cache.view(torch.int32), cache.view(torch.float32)[:, di // 4:]
        stride_kr = stride_ksr = cache.stride(0) // 4
    else:
        if cache.shape[1] != di:
            raise ValueError(f"index cache width {cache.shape[1]} != Di {di}")
        kdata, kscale, stride_kr, stride_ksr = cache, cache, cache.stride(0), 0
    q = q if q.stride(2) == 1 else q.contiguous()
    w = w.float()
    interp = _interpreted()
    # Triton's interpreter multiplies bf16 tiles wrongly, so it gets fp32 tiles (exact for these inputs).
    # fp32 keys are not exact in bf16, so an fp32 cache takes the fp32 path too.
    dot_f32 = interp or q.dtype == torch.float32 or (not fp8 and cache.dtype == torch.float32)
    n_tiles = triton.cdiv(max_len, block_n)
    tpp = tiles_per_prog or _tiles_per_prog(bsz, n_tiles, q.device)
    grid = (bsz, triton.cdiv(n_tiles, tpp))
    _indexer_kernel[grid](
        q, w, kdata, kscale, block_table, lens, out,
        q.stride(0), q.stride(1), w.stride(0), stride_kr, stride_ksr, block_table.stride(0), out.stride(0),
        page_size, max_len, scale, pos_i, pos_d, pos_r, EMPTY_KEY,
        HI=hi, DI=di, BLOCK_N=block_n, TPP=tpp, FP8=fp8, QT=tl.float32 if dot_f32 else tl.bfloat16,
        PREC="ieee" if dot_f32 else "tf32", INTERP=interp, SWAP=swap_ab, KEYS=keys is not None,
        num_warps=num_warps, num_stages=num_stages)
    return out


def _dequant_rows_ref(cache: torch.Tensor, rows: torch.Tensor, di: int, fp8: bool) -> torch.Tensor:
    r = cache[rows]
    if not fp8:
        return r.float()
    vals = r[..., :di].contiguous().view(_FP8).float()
    scl = r[..., di:].contiguous().view(torch.float32)
    return vals * scl


def indexer_scores_ref(q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                       lens: torch.Tensor, page_size: int, scale: float, fp8: bool,
                       max_len: int | None = None) -> torch.Tensor:
    bsz, _, di = q.shape
    if max_len is None:
        max_len = int(lens.max().item()) if bsz else 0
    j = torch.arange(max_len, device=q.device)
    valid = j[None, :] < lens.long()[:, None]
    page_idx = (j // page_size).clamp(max=block_table.shape[1] - 1)
    pages = block_table.long()[:, page_idx]
    rows = torch.where(valid, pages * page_size + j % page_size, 0)
    keys = _dequant_rows_ref(cache, rows, di, fp8)  # [B, L, Di]
    s = torch.relu(torch.einsum("bhd,bld->bhl", q.float(), keys) * scale)
    out = torch.einsum("bh,bhl->bl", w.float(), s)
    return out.masked_fill(~valid, float("-inf"))


def indexer_keys_ref(q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     lens: torch.Tensor, page_size: int, scale: float, fp8: bool, max_len: int,
                     positions: torch.Tensor) -> torch.Tensor:
    """Torch reference of `indexer_scores(..., keys=...)`: positions [B, max_len] is the layout's table of
    global positions of local tokens, PAD_POS past lens[b] (`SlotLayout.local_position_table`)."""
    return pack_keys(indexer_scores_ref(q, w, cache, block_table, lens, page_size, scale, fp8, max_len), positions)


# -------------------------------------------------------------------------------------- owned-row compaction
@triton.jit
def _compact_owned_kernel(keys_ptr, bt_ptr, rows_ptr, counts_ptr, K, n_pages,
                          stride_kb, stride_btb, stride_rb, pos_i, pos_d, pos_r, gps, BLOCK: tl.constexpr):
    """Program b: of the K selected keys of sequence b, keep the tokens rank pos_r owns, map each position to
    its local cache row through the block table, and write them to the front of rows[b] (in key order,
    by a prefix count), zeros behind; counts[b] = how many."""
    b = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    inb = e < K
    key = tl.load(keys_ptr + b * stride_kb + e, mask=inb, other=0)
    low = key & 4294967295
    pos = 4294967295 - low
    owned = inb & (low != 0) & ((pos // pos_i) % pos_d == pos_r)
    pos = tl.where(owned, pos, 0)
    page = tl.load(bt_ptr + b * stride_btb + tl.minimum(pos // gps, n_pages - 1), mask=owned, other=0)
    slot = page.to(tl.int64) * gps + pos % gps
    row = (slot // (pos_i * pos_d)) * pos_i + slot % pos_i
    dest = tl.cumsum(owned.to(tl.int32), 0) - 1
    tl.store(rows_ptr + b * stride_rb + dest, row.to(tl.int32), mask=owned)
    cnt = tl.sum(owned.to(tl.int32), 0)
    tl.store(rows_ptr + b * stride_rb + e, tl.zeros([BLOCK], tl.int32), mask=inb & (e >= cnt))
    tl.store(counts_ptr + b, cnt)


def compact_owned(keys: torch.Tensor, block_table: torch.Tensor, interleave: int, dcp: int, rank: int,
                  page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected top-k keys [B, K] (any order, EMPTY_KEY for none) -> (local rows int32 [B, K] of the tokens
    rank `rank` owns, compacted to the front, zeros behind; counts int32 [B]). The torch reference is
    `dcpserve.attention.indexer.compact_owned` (the same rows in the same key order, as int64)."""
    bsz, k = keys.shape
    rows = torch.empty(bsz, k, dtype=torch.int32, device=keys.device)
    counts = torch.empty(bsz, dtype=torch.int32, device=keys.device)
    if bsz == 0 or k == 0:
        return rows, counts.zero_()
    keys, block_table = keys.contiguous(), block_table.contiguous()
    _compact_owned_kernel[(bsz,)](keys, block_table, rows, counts, k, max(block_table.shape[1], 1),
                                  keys.stride(0), block_table.stride(0), rows.stride(0),
                                  interleave, dcp, rank, page_size * dcp,
                                  BLOCK=max(16, triton.next_power_of_2(k)), num_warps=4)
    return rows, counts
