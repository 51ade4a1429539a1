"""One-kernel DCP collectives over peer-mapped memory: an all-gather and an all-to-all fused with the LSE merge.

At batch 1 the DCP collectives move a few KB each; NCCL spends about 10 us per call on that (H200, in a
CUDA graph), and the all-to-all path adds a pack copy before and a merge kernel after. Here every rank
owns one buffer that every peer can read directly (`distributed/p2p.py` maps them), and each collective
is one kernel that *pulls* from the peers:

- `p2p_gather`: each CTA copies its slice of the local input into this rank's buffer, tells the peers'
  matching CTAs that the slice is there, waits for theirs, and reads the same slice of every peer's
  buffer straight into the output's final layout [B, d, M] (no permute copy after it).
- `p2p_merge`: the attention kernel has already written this rank's partials (out, LSE for the whole
  group's heads) into its buffer; each CTA signals, waits, and reads only the partials of this rank's
  own heads from every peer and merges them (the weights come from `merge.lse_weights`, as in
  `merge_lse`). One kernel replaces the pack copy, the all-to-all and the merge.

Synchronisation: each rank's buffer starts with a counter per (CTA, peer). A CTA adds 1 (release, system
scope) to counter [cta, own rank] of every peer after its data is in place, then waits until its own
counters [cta, p] are >= 1 for every peer p (acquire), and takes 1 back. Counters are semaphores: a fast
peer may signal the next collective before this one consumed its count, and nothing is lost. Buffer
reuse is safe without a second barrier because each region is rewritten only after at least one other
collective's barrier, which every peer passes only once it finished reading the region (see
`distributed/p2p.py`). Grids are the same on every rank (same shapes), so CTA i always meets CTA i.

`PHASE` splits a launch into its signalling half (1) and its waiting-and-reading half (2) so that the
tests can run d simulated ranks one after another in the Triton interpreter; production launches use 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dcpserve.kernels._common import interpreting
from dcpserve.kernels.merge import lse_weights, merge_lse_ref

MAX_CTAS = 128  # counters per peer; every launch's grid is at most this
MAX_WORLD = 8  # the kernels index counters as cta * 8 + rank (distributed/p2p.py refuses larger groups)
SIGNAL_WORDS = MAX_CTAS * MAX_WORLD  # int32 counters at the start of every rank's buffer


@dataclass
class PeerTable:
    """Where every rank's buffer is mapped in this process. bases: int64 [W] on the device (W = world
    rounded up to a power of two, 0 past the world); regions are int32-word offsets from a base."""

    bases: torch.Tensor
    rank: int
    world: int

    @property
    def width(self) -> int:
        return self.bases.shape[0]


def peer_width(world: int) -> int:
    return max(2, 1 << (world - 1).bit_length())


@triton.jit
def _arrive(bases, rank, world, cta, W: tl.constexpr):
    """+1 on counter [cta, rank] of every peer: this CTA's data is in place (release, system scope)."""
    q = tl.arange(0, W)
    peer = (q < world) & (q != rank)
    base = tl.load(bases + q).to(tl.pointer_type(tl.int32))
    tl.atomic_add(base + cta * 8 + rank, 1, mask=peer, sem="release", scope="sys")


@triton.jit
def _await(bases, rank, world, cta, W: tl.constexpr):
    """Wait until counter [cta, p] of this rank is >= 1 for every peer p, then take 1 from each."""
    q = tl.arange(0, W)
    peer = (q < world) & (q != rank)
    mine = tl.load(bases + rank).to(tl.pointer_type(tl.int32)) + cta * 8 + q
    ready = False
    while not ready:  # a scalar loop-carried value: a tensor one trips Triton 3.6's layout pass
        seen = tl.atomic_add(mine, 0, mask=peer, sem="acquire", scope="sys")
        ready = tl.min(tl.where(peer, seen, 1), 0) >= 1
    tl.atomic_add(mine, -1, mask=peer, sem="relaxed", scope="sys")


@triton.jit
def _peer(bases, p, dtype):
    """Rank p's buffer. Symmetric-memory buffers are page-aligned: saying so lets the compiler use 16-byte
    loads (without it every word was a separate 4-byte load, and the NVLink reads crawled)."""
    return tl.multiple_of(tl.load(bases + p).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _p2p_gather_kernel(x_ptr, out_ptr, bases, rank, world, region, total, row_words, chunk,
                       W: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, PHASE: tl.constexpr):
    cta = tl.program_id(0)
    start = cta * chunk
    end = tl.minimum(start + chunk, total)
    if PHASE % 2 == 1:
        mine = _peer(bases, rank, tl.int32) + region
        for i in range(start, end, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            m = offs < end
            tl.store(mine + offs, tl.load(x_ptr + offs, mask=m), mask=m)
        tl.debug_barrier()  # every thread's slice is written before the release below
        _arrive(bases, rank, world, cta, W)
    if PHASE >= 2:
        _await(bases, rank, world, cta, W)
        tl.debug_barrier()
        for i in range(start, end, BLOCK):
            offs = i + tl.arange(0, BLOCK)
            m = offs < end
            b = offs // row_words
            # VEC words never straddle a row (row_words % VEC == 0): the destination is contiguous per VEC.
            dst = tl.max_contiguous(tl.multiple_of(b * (world * row_words) + (offs - b * row_words), VEC), VEC)
            # Unrolled and masked, not branched: the peers' loads are in flight together.
            for p in tl.static_range(W):
                src = _peer(bases, p, tl.int32) + region
                mp = m & (p < world)
                tl.store(out_ptr + dst + p * row_words, tl.load(src + offs, mask=mp, cache_modifier=".cg"), mask=mp)


@triton.jit
def _own_head(row, H, DH, rank):
    """Row (b, h) of this rank's [B, H] output -> its head in the group's [B, d*H] partials."""
    return (row // H) * DH + rank * H + row % H


@triton.jit
def _p2p_merge_kernel(out_ptr, lse_out_ptr, bases, rank, world, part, lses, n_rows, H, DH, V, n_blocks,
                      W: tl.constexpr, R: tl.constexpr, BLOCK_V: tl.constexpr, PHASE: tl.constexpr):
    cta = tl.program_id(0)
    if PHASE % 2 == 1:  # the partials were written by the previous kernel: nothing to copy first
        _arrive(bases, rank, world, cta, W)
    if PHASE >= 2:
        _await(bases, rank, world, cta, W)
        tl.debug_barrier()
        q = tl.arange(0, W)
        fbase = tl.load(bases + q).to(tl.pointer_type(tl.float32))
        v = tl.arange(0, BLOCK_V)
        r = tl.arange(0, R)
        # R rows at a time, so that R x W partial rows are in flight per CTA: the reads cross NVLink, and
        # one row at a time left each CTA waiting a round trip per 2 KB.
        for blk in range(cta, n_blocks, tl.num_programs(0)):
            rows = blk * R + r
            rmask = rows < n_rows
            g = _own_head(rows, H, DH, rank)
            # Weights one row at a time through the all-to-all merge's own helper (same vector shape and warps
            # as `merge_lse`), so both merges round identically.
            w = tl.zeros([R, W], dtype=tl.float32)
            total = tl.zeros([R], dtype=tl.float32)
            for i in tl.static_range(R):
                row = blk * R + i
                lse = tl.load(fbase + lses + _own_head(row, H, DH, rank), mask=(q < world) & (row < n_rows),
                              other=float("-inf"), cache_modifier=".cg")
                wi, ti = lse_weights(lse)
                w = tl.where(r[:, None] == i, wi[None, :], w)
                total = tl.where(r == i, ti, total)
            acc = tl.zeros([R, BLOCK_V], dtype=tl.float32)
            m = rmask[:, None] & (v < V)[None, :]
            for p in tl.static_range(W):
                wp = tl.sum(tl.where(q[None, :] == p, w, 0.0), 1)[:, None]
                src = _peer(bases, p, tl.float32) + part + g[:, None] * V + v[None, :]
                x = tl.load(src, mask=m & (p < world), other=0.0, cache_modifier=".cg")
                acc += wp * tl.where(wp > 0.0, x, 0.0)  # an empty partial's garbage (even NaN) never leaks
            tl.store(out_ptr + rows[:, None] * V + v[None, :], acc, mask=m)
            tl.store(lse_out_ptr + rows, total, mask=rmask)


def _block_words(total: int) -> int:
    """Words a CTA moves per loop step: enough CTAs for small payloads (latency), big steps for large ones
    (each step waits one NVLink round trip, so bytes in flight set the bandwidth)."""
    if interpreting():
        return 64
    return min(max(triton.next_power_of_2(triton.cdiv(total, MAX_CTAS)), 512), 2048)


def p2p_gather(x: torch.Tensor, out: torch.Tensor, table: PeerTable, region: int, phase: int = 3) -> torch.Tensor:
    """x: [B, M] int32 (this rank's rows), out: [B, d, M] int32 -> out[b, p] = rank p's x[b]. `region`: the
    int32-word offset in every rank's buffer where x is staged (room for B*M words)."""
    b, m = x.shape
    if out.shape != (b, table.world, m) or not (x.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"p2p_gather: x {tuple(x.shape)} and out {tuple(out.shape)} must be contiguous "
                         "[B, M] and [B, d, M]")
    total = b * m
    if total == 0:
        return out
    block = _block_words(total)
    chunk = triton.cdiv(triton.cdiv(total, MAX_CTAS), block) * block
    grid = (triton.cdiv(total, chunk),)
    _p2p_gather_kernel[grid](x, out, table.bases, table.rank, table.world, region, total, m, chunk,
                             W=table.width, BLOCK=block, VEC=4 if m % 4 == 0 else 1, PHASE=phase, num_warps=4)
    return out


def p2p_merge(out: torch.Tensor, lse_out: torch.Tensor, table: PeerTable, part: int, lses: int,
              b: int, h: int, phase: int = 3, rows_per_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge this rank's H heads from every rank's partials. Every rank's buffer holds, at fp32 offsets
    `part` and `lses`, its partial out [B, d*H, V] and LSE [B, d*H]. out: [B, H, V] fp32, lse_out [B, H]."""
    v = out.shape[-1]
    if out.shape != (b, h, v) or lse_out.shape != (b, h) or not (out.is_contiguous() and lse_out.is_contiguous()):
        raise ValueError(f"p2p_merge: out {tuple(out.shape)} / lse {tuple(lse_out.shape)} must be contiguous "
                         f"[{b}, {h}, V] / [{b}, {h}]")
    n_rows = b * h
    if n_rows == 0:
        return out, lse_out
    # Rows per block: one while the grid is not full (small batches, latency-bound), up to 4 for large ones
    # (8 rows with 8 warps, and 4096-word gather steps, were no faster on 2x H200 at batch 64; measured while
    # the reads were still 4-byte loads, see `_peer`).
    rows = rows_per_block or min(4, triton.next_power_of_2(triton.cdiv(n_rows, MAX_CTAS)))
    n_blocks = triton.cdiv(n_rows, rows)
    grid = (min(n_blocks, MAX_CTAS),)
    _p2p_merge_kernel[grid](out, lse_out, table.bases, table.rank, table.world, part, lses, n_rows, h,
                            table.world * h, v, n_blocks, W=table.width, R=rows, BLOCK_V=triton.next_power_of_2(v),
                            PHASE=phase, num_warps=4)
    return out, lse_out


# -- torch references -----------------------------------------------------------------------------------


def p2p_gather_ref(xs: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's [B, M] stacked to [B, d, M]."""
    return torch.stack(xs, dim=1)


def p2p_merge_ref(outs: list[torch.Tensor], lses: list[torch.Tensor], rank: int, h: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's partials out [B, d*H, V], lse [B, d*H] -> rank `rank`'s merged heads [B, H, V], [B, H]."""
    own = slice(rank * h, (rank + 1) * h)
    return merge_lse_ref(torch.stack([o[:, own] for o in outs]), torch.stack([s[:, own] for s in lses]))
