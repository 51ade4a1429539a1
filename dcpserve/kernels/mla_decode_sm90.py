"""Dense paged MLA decode for Hopper (sm_90), written in Gluon: explicit warpgroup MMAs, no duplicated work.

Same contract as `mla_decode.mla_decode` (absorbed query, paged latent pool, split-KV, natural-log LSE),
restricted to what the tensor-core path needs: a bf16 or fp8 ("656 B") cache, kv_lora 512 and rope 64 (the
DeepSeek MLA dims); any head count (33-63 pad the 64-row tile with zero queries; <= 32 take the swapped
kernel below). `supported()` says when it
applies; `mla_decode` falls back to the portable Triton kernel otherwise, and `mla_decode_ref` (torch) is the
reference for both.

Why a second kernel. With 128 heads one latent row feeds 128 * 2 * 1088 FLOP, so dense decode is bound by
the tensor cores, not by HBM (242 FLOP/B in bf16). The portable kernel lets Triton pick the MMA layouts, and
for a dot feeding a dot it gives the 64-row score tile to both warpgroups, which then compute the same
scores (1.5x the useful MMA work). Here the layouts are chosen by hand, as in FlashMLA:
  * one program = 64 heads x one KV split, 8 warps = 2 warpgroups;
  * S = Q K^T [64, 64] is split by key columns: each warpgroup computes 32 of the 64 keys (no overlap);
  * the softmax row max / sum reduce across the two warpgroups;
  * P (bf16) goes through shared memory, and O = P V [64, 512] is split by value columns: each warpgroup
    owns 256 of them (128 fp32 registers per thread);
  * Q stays in shared memory for the whole split; K tiles of 64 rows are gathered through the block table
    with cp.async (any page size, rows past the end zero-filled) into two stages:
    Q 72 KB + 2 x 72 KB + P 8 KB = 224 KB of the 227 KB a block may use.
The next tile's copy is issued once both warpgroups are past the MMAs that read its stage (the previous
tile's P V), so it overlaps this tile's softmax and P V. Issuing it before this tile's scores instead (after
draining the previous P V) measured 1-3% slower on H100.

Measured (H100 80GB HBM3, copy 3001 GB/s, 128 heads, page 64, `python -m dcpserve.bench.kernels`): 53-56% of
copy bandwidth (388-409 TFLOP/s) at batch >= 32 and context >= 32K, against 35-36% (252-263 TFLOP/s) for
the portable kernel. Predicted before measuring: 1.5x from dropping the duplicated score MMAs (the portable
kernel does 1.53x the useful work); measured 1.55x.

What is left (Nsight Compute, batch 32, ctx 32K, H100): the tensor pipe is busy 41% of the cycles, shared
memory 56%, DRAM 39%; the same run with every block-table entry pointing at one page (all L2 hits) is no
faster, so neither HBM bandwidth nor load latency limits it. The tensor cores idle while both warpgroups run
the softmax between a tile's scores and its P V (they meet at barriers every tile). Two cheap fixes were
compiled and dropped without timing: skipping the accumulator rescale unless a row max grows by 2^8 (lazy
rescaling), and issuing the next copy after P V instead of before the softmax; at 255 registers both spill
and make ptxas serialize the wgmma pipeline (warning C7515). Overlapping the softmax with MMAs needs a
third K stage (no shared memory left: Q and two stages take 216 KB) or warp specialization with one
warpgroup on scores + softmax and the other on P V, as FlashMLA does. A Gluon version of that (producer
partition + two consumer warpgroups owning alternate tiles) was built, correct, and 1.37x slower on H200:
with two stages the gathers start late, and avoiding C7514 chains the score MMAs behind the softmax
(docs/PERF.md section 2).

Up to 32 heads (a plain TP4 / TP8 rank of DeepSeek) `_mla_decode_sm90_swap_kernel` runs instead: the same
tiles and pipeline with the MMA operands swapped (S^T = K Q^T, O^T = V^T P^T), so the heads are the MMAs' N
(16 or 32 per program) and no zero query rows are multiplied. In the 64-row tile, 16 / 32 heads did 4x / 2x
the useful MMA work and sat at 76-81% of copy bandwidth on H200 (batch >= 32, context >= 32K); swapped,
bf16 reaches 82-88% at 32 heads and 89-96% at 16 (docs/PERF.md section 2). A deeper pipeline for these
shapes was tried and dropped earlier (2026-11-28, H200, 64-row tile): 32-key tiles with 3 or 4 stages (184 /
221 KB of shared memory, no spills) reached only 54-58% at every head count, since each key then pays twice
the per-tile barriers and softmax reductions.

fp8 cache (FP8=True). The MMAs stay bf16, as in FlashMLA's fp8 path; only the latent bytes change route.
Shared memory has no room for a staged fp8 copy next to the two bf16 K stages (224 KB are taken), so the
next tile's e4m3 bytes and scales are loaded into registers (32 + 2 per thread) while this tile's scores
and softmax run, and dequantized into the free bf16 stage while this tile's P V runs on the tensor cores.
The rope columns (bf16 in the row) still go by cp.async. The values are rounded exactly as in the portable
kernel (e4m3 * fp32 scale, then bf16), so both kernels compute the same sums. Measured (H200, batch >= 32,
ctx >= 32K): 31-33% of copy bandwidth at 16-64 heads, 16-17% (291-298 TFLOP/s) at 128; 1.3-1.9x the portable
kernel, but 1.3x the bf16 cache's time per token. Loading each tile's page id a tile ahead (`_tile_page`)
took fp8 at page 64 to 35.5-36.1% / 18.1-18.3% (+10%) and at page 16 from 30-32% to 32-34%; bf16 unchanged.
Where the fp8 time goes (swapped kernel, 32 heads, batch 128, ctx 32K, H200; variants that leave a stage
out): 3.55 us per 64-key tile per SM; 3.10 with every latent load masked off; 2.26 without loads and
dequantization; 4.55 dequantizing twice. So the dequantization (~400 instructions per thread per tile and
64 KB of shared-memory stores) costs ~1 us of each tile's critical path and the loads ~0.45; the bf16 cache
takes 2.65. Loading the fp8 tile two tiles ahead instead of one measured the same (it needs the bytes as
32-bit words: a byte tensor carried across loop iterations takes a register per byte and spills, which is
likely also why the 64-head kernel spilled when its loads were issued a tile earlier).

Sparse decode (DSA) runs this kernel too: `mla_sparse_decode` calls `mla_decode` with each query's compacted
row list as its block table, page size 1 and its count as its length, so a tile's 64 keys are 64 arbitrary
rows (their ids loaded a tile ahead, like the per-key page ids at page 16). 1.5-2.0x the former portable
sparse kernel at batch 128 (H200; docs/PERF.md section 2).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile

import torch
import triton

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                             warpgroup_mma_wait)

from dcpserve.kernels._common import LOG2E

KV_LORA = gl.constexpr(512)
ROPE = gl.constexpr(64)
BLOCK_H = gl.constexpr(64)
BLOCK_N = gl.constexpr(64)
QBLK = gl.constexpr(128)  # fp8 cache: values per fp32 scale (LatentFormat.block)
NSC = gl.constexpr(4)  # fp8 cache: scales per row
NUM_WARPS = gl.constexpr(8)
LN2 = gl.constexpr(0.6931471805599453)
# fp8 tile [keys, scale blocks, values] in registers: 16 bytes per thread (one 16-byte load), and a
# quarter-warp's 8 threads on two keys (order: values, keys, blocks), so that their 16-byte stores of the
# dequantized bf16 land on distinct banks of the 128-byte-swizzled stage. With one key per warp they hit each
# bank twice; the 64-head kernel measured 4-5% faster with fp8 at 64 and 128 heads (H200), the swapped one
# the same.
FP8_TILE_L = gl.constexpr(gl.BlockedLayout([1, 1, 16], [2, 4, 4], [8, 1, 1], [2, 0, 1]))
LAT_L = gl.constexpr(gl.BlockedLayout([1, 8], [1, 32], [8, 1], [1, 0]))  # gathers: 16-byte pieces, a warp per row
PE_L = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0]))


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:  # cached: mla_decode asks on every decode step
    return torch.cuda.get_device_capability(index)[0] == 9


def supported(q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int, rope_dim: int, fp8: bool) -> bool:
    """True where these kernels run: a Hopper GPU and a bf16 or fp8 latent cache of the DeepSeek dims, any head
    count (`block_h` picks the 64-head kernel or the swapped one)."""
    want = torch.uint8 if fp8 else torch.bfloat16
    if not q.is_cuda or cache.dtype != want or (kv_lora_rank, rope_dim) != (KV_LORA.value, ROPE.value):
        return False
    if q.shape[1] < 1 or not _is_sm90(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return False
    # cp.async moves 16-byte pieces, so rows must start 16-byte aligned; Triton proves that for the row
    # stride only when it is a multiple of 16 elements (576 bf16 and 656 fp8 bytes are).
    return cache.stride(0) % 16 == 0 and cache.data_ptr() % 16 == 0


@gluon.jit
def _tile_page(bt_row, n0, end, PAGE: gl.constexpr):
    """The block-table entries of keys [n0, n0 + BLOCK_N), 0 past the end. The kernel loads them a tile before
    the tile's gather needs them, so the gather's addresses wait on no block-table load. Where every tile lies
    inside one page (PAGE a multiple of BLOCK_N; tiles start at multiples of BLOCK_N) that is one scalar;
    else one page per key, [BLOCK_N] spread one per thread (the gathers convert it to their layouts)."""
    if PAGE % BLOCK_N == 0:
        return gl.load(bt_row + n0 // PAGE, mask=n0 < end, other=0)
    else:
        offs = n0 + gl.arange(0, BLOCK_N, layout=gl.BlockedLayout([1], [32], [NUM_WARPS], [0]))
        return gl.load(bt_row + offs // PAGE, mask=offs < end, other=0)


@gluon.jit
def _row_ptrs(cache_ptr, bt_row, page, n0, end, row_stride, PAGE: gl.constexpr, L: gl.constexpr):
    """Pointers to the pool rows holding keys [n0, n0 + BLOCK_N) (SliceLayout(1, L)) and which of them are
    keys (< end). Rows of non-keys must never be read: a page's unused tail may hold anything.
    `page`: the tile's block-table entries from `_tile_page`."""
    offs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, L))
    valid = offs < end
    if PAGE % BLOCK_N == 0:
        rows = page.to(gl.int64) * PAGE + offs % PAGE
    else:
        rows = gl.convert_layout(page, gl.SliceLayout(1, L)).to(gl.int64) * PAGE + offs % PAGE
    return cache_ptr + rows * row_stride, valid


@gluon.jit
def _gather_cols(buf, cache_ptr, bt_row, page, n0, end, row_stride, COL0: gl.constexpr, WIDTH: gl.constexpr,
                 PAGE: gl.constexpr, L: gl.constexpr, AS_BF16: gl.constexpr):
    """cp.async columns [COL0, COL0 + WIDTH) of the pool rows holding keys [n0, n0 + BLOCK_N) into `buf`
    (keys at or past `end` zero-filled). AS_BF16: COL0 is a byte offset into uint8 (fp8-format) rows whose
    columns from there on are bf16."""
    base, valid = _row_ptrs(cache_ptr, bt_row, page, n0, end, row_stride, PAGE, L)
    if AS_BF16:
        base = (base + COL0).to(gl.pointer_type(gl.bfloat16))
        cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, L))
    else:
        cols = COL0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, L))
    async_copy.async_copy_global_to_shared(buf, base[:, None] + cols[None, :], mask=valid[:, None])


@gluon.jit
def _issue_tile(lat_buf, pe_buf, cache_ptr, bt_row, page, n0, end, row_stride,
                PAGE: gl.constexpr, FP8: gl.constexpr):
    """Start the copy of keys [n0, n0 + BLOCK_N) into one stage: latent and rope parts (bf16 cache), or only
    the rope part (fp8 cache: its latent goes through registers, see `_load_fp8` / `_store_dequant`)."""
    if FP8:
        _gather_cols(pe_buf, cache_ptr, bt_row, page, n0, end, row_stride, KV_LORA + 4 * NSC, ROPE, PAGE, PE_L, True)
    else:
        _gather_cols(lat_buf, cache_ptr, bt_row, page, n0, end, row_stride, 0, KV_LORA, PAGE, LAT_L, False)
        _gather_cols(pe_buf, cache_ptr, bt_row, page, n0, end, row_stride, KV_LORA, ROPE, PAGE, PE_L, False)


@gluon.jit
def _load_fp8(cache_ptr, bt_row, page, n0, end, row_stride, PAGE: gl.constexpr):
    """Start the global loads of an fp8 tile: e4m3 latent bytes [BLOCK_N, NSC, QBLK] and their fp32 scales
    [BLOCK_N, NSC] (layout FP8_TILE_L / its slice). They land in registers while the caller's MMAs and softmax run.
    Non-keys read as 0."""
    SC_L: gl.constexpr = gl.SliceLayout(2, FP8_TILE_L)
    base, valid = _row_ptrs(cache_ptr, bt_row, page, n0, end, row_stride, PAGE, SC_L)
    blk = gl.arange(0, NSC, layout=gl.SliceLayout(0, SC_L))
    col = gl.arange(0, QBLK, layout=gl.SliceLayout(0, gl.SliceLayout(1, FP8_TILE_L)))
    ptrs = gl.expand_dims(base[:, None] + blk[None, :] * QBLK, 2) + col[None, None, :]
    raw = gl.load(ptrs, mask=gl.expand_dims(valid[:, None], 2), other=0)
    sp = (base + KV_LORA).to(gl.pointer_type(gl.float32))
    sc = gl.load(sp[:, None] + blk[None, :], mask=valid[:, None], other=0.0)
    return raw, sc


@gluon.jit
def _store_dequant(buf, raw, sc):
    """buf [BLOCK_N, KV_LORA] bf16 = e4m3(raw) * the scale of its block: the LatentFormat decode."""
    vals = raw.to(gl.float8e4nv, bitcast=True).to(gl.float32) * gl.expand_dims(sc, 2)
    buf.store(gl.reshape(vals.to(gl.bfloat16), [BLOCK_N, KV_LORA]))


@gluon.jit
def _stage_q(buf, q_ptr, pid_h, pid_b, stride_qb, stride_qh, n_heads, NH: gl.constexpr, COL0: gl.constexpr,
             WIDTH: gl.constexpr, L: gl.constexpr):
    """Columns [COL0, COL0 + WIDTH) of this program's NH query heads into `buf` as bf16 (rows past n_heads are
    zeros)."""
    heads = pid_h * NH + gl.arange(0, NH, layout=gl.SliceLayout(1, L))
    rows = q_ptr + pid_b * stride_qb + heads.to(gl.int64)[:, None] * stride_qh
    cols = COL0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, L))
    buf.store(gl.load(rows + cols[None, :], mask=heads[:, None] < n_heads, other=0.0).to(gl.bfloat16))


@gluon.jit
def _split_range(lens_ptr, pid_s, pid_b, num_splits):
    """Keys [start, end) of this program's split of sequence pid_b (whole BLOCK_N tiles but the last), and how
    many tiles that is."""
    seq_len = gl.load(lens_ptr + pid_b)
    chunk = gl.cdiv(gl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * chunk
    end = gl.minimum(start + chunk, seq_len)
    return start, end, gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)


@gluon.jit
def _allocate(NH: gl.constexpr, P_ROWS: gl.constexpr, P_COLS: gl.constexpr):
    """A program's shared memory, bf16 in wgmma operand layouts: its NH query heads (latent and rope parts), two
    K stages of BLOCK_N keys, and the P buffer [P_ROWS, P_COLS]."""
    lat_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, KV_LORA], gl.bfloat16)
    pe_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, ROPE], gl.bfloat16)
    q_lat_s = gl.allocate_shared_memory(gl.bfloat16, [NH, KV_LORA],
                                        gl.NVMMASharedLayout.get_default_for([NH, KV_LORA], gl.bfloat16))
    q_pe_s = gl.allocate_shared_memory(gl.bfloat16, [NH, ROPE],
                                       gl.NVMMASharedLayout.get_default_for([NH, ROPE], gl.bfloat16))
    k_lat_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, KV_LORA], lat_sl)
    k_pe_s = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, ROPE], pe_sl)
    p_s = gl.allocate_shared_memory(gl.bfloat16, [P_ROWS, P_COLS],
                                    gl.NVMMASharedLayout.get_default_for([P_ROWS, P_COLS], gl.bfloat16))
    return q_lat_s, q_pe_s, k_lat_s, k_pe_s, p_s


@gluon.jit
def _start(q_lat_s, q_pe_s, k_lat_s, k_pe_s, q_ptr, cache_ptr, bt_row, pid_h, pid_b, stride_qb, stride_qh, n_heads,
           row_stride, start, end, n_tiles, NH: gl.constexpr, PAGE: gl.constexpr, FP8: gl.constexpr,
           EMPTY_TILE: gl.constexpr):
    """Before the tile loop: start the first tile's copy into stage 0 (fp8: load and dequantize it), stage this
    program's NH query heads, and return the second tile's block-table entries. EMPTY_TILE: copy (zero-fill)
    stage 0 even when the split is empty, for a kernel whose loop then runs one masked tile."""
    page = _tile_page(bt_row, start, end, PAGE)
    next_page = _tile_page(bt_row, start + BLOCK_N, end, PAGE)
    if EMPTY_TILE or n_tiles > 0:
        _issue_tile(k_lat_s.index(0), k_pe_s.index(0), cache_ptr, bt_row, page, start, end, row_stride, PAGE, FP8)
    async_copy.commit_group()
    if FP8:
        raw, sc = _load_fp8(cache_ptr, bt_row, page, start, end, row_stride, PAGE)
        _store_dequant(k_lat_s.index(0), raw, sc)
    # Q: once per program, through registers (bf16 for the MMA).
    _stage_q(q_lat_s, q_ptr, pid_h, pid_b, stride_qb, stride_qh, n_heads, NH, 0, KV_LORA, LAT_L)
    _stage_q(q_pe_s, q_ptr, pid_h, pid_b, stride_qb, stride_qh, n_heads, NH, KV_LORA, ROPE, PE_L)
    return next_page


@gluon.jit
def _await_tile():
    """Top of a tile: wait for this thread's copies into the tile's stage, then make every thread's copies
    visible to the MMAs (cp.async wrote through the generic proxy; the MMAs read through the async proxy)."""
    async_copy.wait_group(0)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _refill(k_lat_s, k_pe_s, stage, cache_ptr, bt_row, next_page, n_next, end, row_stride, more, PAGE: gl.constexpr,
            FP8: gl.constexpr):
    """After a tile's score MMAs have been waited for: once both warpgroups are here, they are past the previous
    P V, so the other stage and the P buffer are free again; start the next tile's copy (keys from n_next)
    into that stage if there is one (`more`)."""
    gl.thread_barrier()
    if more:
        _issue_tile(k_lat_s.index(1 - stage), k_pe_s.index(1 - stage), cache_ptr, bt_row, next_page, n_next, end,
                    row_stride, PAGE, FP8)
    async_copy.commit_group()


@gluon.jit
def _store_lse(lse_ptr, lse, pid_h, pid_s, pid_b, stride_ls, stride_lb, n_heads, NH: gl.constexpr):
    """lse [NH] (any 1-D layout) of this program's heads into split pid_s's partial LSE."""
    heads = pid_h * NH + gl.arange(0, NH, layout=lse.type.layout)
    base = lse_ptr + pid_s.to(gl.int64) * stride_ls + pid_b * stride_lb
    gl.store(base + heads, lse, mask=heads < n_heads)


@gluon.jit
def _mla_decode_sm90_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
                            stride_qb, stride_qh, row_stride, stride_bt,
                            stride_os, stride_ob, stride_oh, stride_ls, stride_lb,
                            n_heads, num_splits, sm_scale_log2,
                            PAGE: gl.constexpr, FP8: gl.constexpr):
    # Layouts. S and O: wgmma accumulators, 4 warps along the 64 heads x 2 warpgroups along the columns.
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16])
    O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, KV_LORA // 2, 16])

    pid_h = gl.program_id(0)
    pid_s = gl.program_id(1)
    pid_b = gl.program_id(2).to(gl.int64)
    start, end, n_tiles = _split_range(lens_ptr, pid_s, pid_b, num_splits)

    q_lat_s, q_pe_s, k_lat_s, k_pe_s, p_s = _allocate(BLOCK_H, BLOCK_H, BLOCK_N)  # P [heads, keys]

    bt_row = bt_ptr + pid_b * stride_bt
    next_page = _start(q_lat_s, q_pe_s, k_lat_s, k_pe_s, q_ptr, cache_ptr, bt_row, pid_h, pid_b, stride_qb, stride_qh,
                       n_heads, row_stride, start, end, n_tiles, BLOCK_H, PAGE, FP8, False)

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, S_L))
    l_i = gl.full([BLOCK_H], 0.0, gl.float32, layout=gl.SliceLayout(1, S_L))
    acc = warpgroup_mma_init(gl.zeros([BLOCK_H, KV_LORA], gl.float32, layout=O_L))  # loop-carried as an async token
    s_init = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, layout=S_L)
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_L))

    for t in range(n_tiles):
        stage = t % 2
        n0 = start + t * BLOCK_N
        page_after = _tile_page(bt_row, n0 + 2 * BLOCK_N, end, PAGE)  # used next tile
        _await_tile()
        k_lat = k_lat_s.index(stage)
        s = warpgroup_mma(q_lat_s, k_lat.permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma(q_pe_s, k_pe_s.index(stage).permute((1, 0)), s, is_async=True)
        if FP8:
            # The next tile's latent bytes travel to registers during this tile's MMAs and softmax (past the
            # last tile every key is masked: no memory is read).
            raw, sc = _load_fp8(cache_ptr, bt_row, next_page, n0 + BLOCK_N, end, row_stride, PAGE)
        s, acc = warpgroup_mma_wait(0, deps=(s, acc))
        _refill(k_lat_s, k_pe_s, stage, cache_ptr, bt_row, next_page, n0 + BLOCK_N, end, row_stride, t + 1 < n_tiles,
                PAGE, FP8)

        s = gl.where((n0 + keys < end)[None, :], s * sm_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))  # finite: every tile holds at least one key
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
        p_s.store(p.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(p_s, k_lat, acc, is_async=True)
        if FP8:
            # Dequantize the next tile into the other stage while the tensor cores run this P V (that
            # stage's last reader, the previous P V, is done).
            _store_dequant(k_lat_s.index(1 - stage), raw, sc)
        next_page = page_after

    acc = warpgroup_mma_wait(0, deps=(acc,))
    has = l_i > 0.0
    l_safe = gl.where(has, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(1, O_L))[:, None]
    lse = gl.where(has, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))

    o_heads = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, O_L))
    o_cols = gl.arange(0, KV_LORA, layout=gl.SliceLayout(0, O_L))
    o_base = out_ptr + pid_s.to(gl.int64) * stride_os + pid_b * stride_ob
    gl.store(o_base + o_heads.to(gl.int64)[:, None] * stride_oh + o_cols[None, :], out,
             mask=o_heads[:, None] < n_heads)
    _store_lse(lse_ptr, lse, pid_h, pid_s, pid_b, stride_ls, stride_lb, n_heads, BLOCK_H)


@gluon.jit
def _mla_decode_sm90_swap_kernel(q_ptr, cache_ptr, bt_ptr, lens_ptr, out_ptr, lse_ptr,
                                 stride_qb, stride_qh, row_stride, stride_bt,
                                 stride_os, stride_ob, stride_oh, stride_ls, stride_lb,
                                 n_heads, num_splits, sm_scale_log2,
                                 PAGE: gl.constexpr, FP8: gl.constexpr, BH: gl.constexpr):
    """The same decode with the MMA operands swapped, for <= 32 heads: S^T = K Q^T [keys, BH] and
    O^T = V^T P^T [512, BH], so the heads are the MMAs' N (any multiple of 8) instead of a 64-row M padded with
    zero queries. Each warpgroup owns BH / 2 heads: their scores over all 64 keys of a tile, their softmax (a
    reduction over keys, across its 4 warps) and their O^T over all 512 value rows (the K stage read
    transposed). The warpgroups share the K stages and meet at the same barriers as in the kernel above."""
    S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BH // 2, 16])
    O_L: gl.constexpr = S_L  # both have the heads as N, so per-head values (alpha, l) pass between them for free

    pid_h = gl.program_id(0)
    pid_s = gl.program_id(1)
    pid_b = gl.program_id(2).to(gl.int64)
    start, end, n_tiles = _split_range(lens_ptr, pid_s, pid_b, num_splits)

    q_lat_s, q_pe_s, k_lat_s, k_pe_s, p_s = _allocate(BH, BLOCK_N, BH)  # P^T [keys, heads]

    bt_row = bt_ptr + pid_b * stride_bt
    # An empty split (end <= start) still runs one tile, all keys masked: a loop that may run zero times makes
    # ptxas serialize every wgmma of the kernel (C7515, the zero-initialized accumulator reaching the final
    # wait). Its gather zero-fills the stage, so P = 0 meets finite values, and m starts finite so that
    # alpha = 1, p = 0 there; l stays 0, which gives out = 0, lse = -inf.
    next_page = _start(q_lat_s, q_pe_s, k_lat_s, k_pe_s, q_ptr, cache_ptr, bt_row, pid_h, pid_b, stride_qb, stride_qh,
                       n_heads, row_stride, start, end, n_tiles, BH, PAGE, FP8, True)

    m_i = gl.full([BH], -1.0e30, gl.float32, layout=gl.SliceLayout(0, S_L))
    # Row sums stay per thread until the end (rescaled with the accumulator): no cross-warp sum per tile.
    l_part = gl.zeros([BLOCK_N, BH], gl.float32, layout=S_L)
    acc = warpgroup_mma_init(gl.zeros([KV_LORA, BH], gl.float32, layout=O_L))
    s_init = gl.zeros([BLOCK_N, BH], gl.float32, layout=S_L)
    keys = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S_L))

    for t in range(gl.maximum(n_tiles, 1)):
        stage = t % 2
        n0 = start + t * BLOCK_N
        page_after = _tile_page(bt_row, n0 + 2 * BLOCK_N, end, PAGE)
        _await_tile()
        k_lat = k_lat_s.index(stage)
        s = warpgroup_mma(k_lat, q_lat_s.permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma(k_pe_s.index(stage), q_pe_s.permute((1, 0)), s, is_async=True)
        if FP8:
            raw, sc = _load_fp8(cache_ptr, bt_row, next_page, n0 + BLOCK_N, end, row_stride, PAGE)
        s, acc = warpgroup_mma_wait(0, deps=(s, acc))
        _refill(k_lat_s, k_pe_s, stage, cache_ptr, bt_row, next_page, n0 + BLOCK_N, end, row_stride, t + 1 < n_tiles,
                PAGE, FP8)

        s = gl.where((n0 + keys < end)[:, None], s * sm_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[None, :])
        l_part = l_part * alpha[None, :] + p
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(0, O_L))[None, :]
        p_s.store(p.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(k_lat.permute((1, 0)), p_s, acc, is_async=True)
        if FP8:
            _store_dequant(k_lat_s.index(1 - stage), raw, sc)
        next_page = page_after

    acc = warpgroup_mma_wait(0, deps=(acc,))
    l_i = gl.sum(l_part, axis=0)
    has = l_i > 0.0
    l_safe = gl.where(has, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, gl.SliceLayout(0, O_L))[None, :]
    lse = gl.where(has, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))

    o_heads = pid_h * BH + gl.arange(0, BH, layout=gl.SliceLayout(0, O_L))
    o_cols = gl.arange(0, KV_LORA, layout=gl.SliceLayout(1, O_L))
    o_base = out_ptr + pid_s.to(gl.int64) * stride_os + pid_b * stride_ob
    gl.store(o_base + o_heads.to(gl.int64)[None, :] * stride_oh + o_cols[:, None], out,
             mask=o_heads[None, :] < n_heads)
    _store_lse(lse_ptr, lse, pid_h, pid_s, pid_b, stride_ls, stride_lb, n_heads, BH)


def block_h(n_heads: int) -> int:
    """Heads per program: 64 (the kernel above), or 16 / 32 for the swapped kernel (<= 32 heads)."""
    return 16 if n_heads <= 16 else (32 if n_heads <= 32 else BLOCK_H.value)


def launch(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
           part_o: torch.Tensor, part_l: torch.Tensor, page_size: int, scale: float, num_splits: int) -> None:
    """Write split partials part_o [splits, B, Hq, 512] / part_l [splits, B, Hq] (see mla_decode)."""
    b, n_heads, _ = q.shape
    bh = block_h(n_heads)
    args = (q, cache, block_table, lens, part_o, part_l,
            q.stride(0), q.stride(1), cache.stride(0), block_table.stride(0),
            part_o.stride(0), part_o.stride(1), part_o.stride(2), part_l.stride(0), part_l.stride(1),
            n_heads, num_splits, scale * LOG2E)
    grid = (triton.cdiv(n_heads, bh), num_splits, b)
    fp8 = cache.dtype == torch.uint8
    if bh == BLOCK_H.value:
        _mla_decode_sm90_kernel[grid](*args, PAGE=page_size, FP8=fp8, num_warps=NUM_WARPS.value)
    else:
        _mla_decode_sm90_swap_kernel[grid](*args, PAGE=page_size, FP8=fp8, BH=bh, num_warps=NUM_WARPS.value)


# What the launcher's JIT specialization proves at real shapes (pointers and these strides divisible by 16).
_AOT_SIGNATURE = dict(q_ptr="*bf16", cache_ptr="*bf16", bt_ptr="*i32", lens_ptr="*i32", out_ptr="*fp32",
                      lse_ptr="*fp32", stride_qb="i32", stride_qh="i32", row_stride="i32", stride_bt="i32",
                      stride_os="i32", stride_ob="i32", stride_oh="i32", stride_ls="i32", stride_lb="i32",
                      n_heads="i32", num_splits="i32", sm_scale_log2="fp32", PAGE="constexpr", FP8="constexpr")
_AOT_DIV16 = ("q_ptr", "cache_ptr", "bt_ptr", "lens_ptr", "out_ptr", "lse_ptr", "stride_qb", "stride_qh",
              "row_stride", "stride_os", "stride_ob", "stride_oh")


def compile_sm90a(page: int = 64, fp8: bool = False, heads: int = 128) -> dict:
    """Compile the kernel that `launch` runs for `heads` heads, for sm_90a and without a GPU (Triton ships ptxas and
    cuobjdump): shared memory bytes, ptxas' resource report and the SASS. Lets CI and a GPU-less machine check
    what the GPU will run. Must run without TRITON_INTERPRET (the interpreter replaces the language functions)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    bh = block_h(heads)
    fn = _mla_decode_sm90_kernel if bh == BLOCK_H.value else _mla_decode_sm90_swap_kernel
    consts = {"PAGE": page, "FP8": fp8} if bh == BLOCK_H.value else {"PAGE": page, "FP8": fp8, "BH": bh}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in _AOT_DIV16}
    sig = {**_AOT_SIGNATURE, "cache_ptr": "*u8" if fp8 else "*bf16", **{k: "constexpr" for k in consts}}
    k = triton.compile(GluonASTSource(fn, sig, consts, attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS.value})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/k.ptx", "w") as f:
            f.write(k.asm["ptx"])
        ptxas = subprocess.run([f"{tools}/ptxas", "-v", "--gpu-name", "sm_90a", f"{d}/k.ptx", "-o", f"{d}/k.cubin"],
                               capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([f"{tools}/cuobjdump", "-sass", f"{d}/k.cubin"], capture_output=True, text=True,
                              check=True).stdout
    return {"shared": k.metadata.shared, "ptxas": ptxas, "sass": sass}


if __name__ == "__main__":  # python -m dcpserve.kernels.mla_decode_sm90 [fp8]: the resource report as JSON
    import sys

    r = compile_sm90a(fp8="fp8" in sys.argv[1:])
    print(json.dumps({"shared": r["shared"], "ptxas": r["ptxas"].strip().splitlines(),
                      "hgmma": sorted({w for w in r["sass"].split() if w.startswith("HGMMA")})}, indent=1))
