"""Peer-mapped buffers for the DCP decode collectives (`--dcp-comm p2p`, the default on CUDA GPUs).

Each rank of a DCP group allocates one buffer in torch's symmetric memory; every peer maps it, so a
kernel on rank r can read rank p's buffer directly (NVLink / PCIe peer access). `kernels/p2p.py` does
the collectives in one kernel each. A buffer holds the kernels' counters and three regions:

  Q     this rank's absorbed queries [B, H, 576] (the query all-gather),
  CAND  its local top-k candidate keys [B, k] (the sharded indexer's all-gather),
  PART  the attention partials over its tokens, out [B, d*H, V] and LSE [B, d*H] fp32 (the merge).

Why one region per use and not per layer: a region is rewritten only after another collective's barrier
(per layer: Q, CAND, then the merge of PART; the next layer's Q comes after this layer's merge), and a
peer passes that barrier only after it finished the kernel that read the region. The regions are sized
for decode batches up to `max_batch` (small batches, where the collectives are latency-bound); larger
batches take the NCCL path of `--dcp-comm a2a`, whose bandwidth is as good there.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcpserve.distributed.parallel import ParallelState

# The kernels (and Triton) are imported where used: CPU installs need neither.
# Decode batches above this use NCCL. 2x H200, TP2 + DCP2, 4 layers, 4K context (docs/PERF.md section 3): p2p's
# decode step was 130 / 138 / 295 / 375 us faster than NCCL's at batch 4 / 16 / 32 / 64, the gap growing with
# the batch; not measured above 64. The buffer then takes ~90 MB per rank at most (batch 256, d * H = 128).
P2P_MAX_BATCH = 256


def p2p_available(ps: ParallelState) -> str | None:
    """None when the DCP group can use peer-mapped buffers, else why not."""
    if ps.device.type != "cuda":
        return "it needs CUDA GPUs"
    if importlib.util.find_spec("triton") is None:
        return "its kernels need Triton (pip install triton)"
    from dcpserve.kernels.p2p import MAX_WORLD

    if ps.dcp_size > MAX_WORLD:
        return f"it supports DCP groups of at most {MAX_WORLD}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return "this torch build has no symmetric memory"
    me = ps.device.index
    for peer in ps.dcp_ranks:  # rank r runs on cuda:r (engine/worker.py)
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return f"GPU {me} cannot access GPU {peer} directly"
    return None


@dataclass
class Regions:
    """int32-word offsets of the three regions in every rank's buffer, and their sizes in words."""

    q: int
    q_words: int
    cand: int
    cand_words: int
    part: int
    part_words: int

    @property
    def total(self) -> int:
        return self.part + self.part_words


def plan_regions(max_batch: int, heads: int, dcp: int, q_dim: int, q_bytes: int, topk: int, v_dim: int) -> Regions:
    from dcpserve.kernels.p2p import SIGNAL_WORDS

    q_words = -(-max_batch * heads * q_dim * q_bytes // 4)
    cand_words = max_batch * topk * 2  # int64 keys
    part_words = max_batch * dcp * heads * (v_dim + 1)
    q = SIGNAL_WORDS
    cand = q + q_words
    part = cand + cand_words
    return Regions(q, q_words, cand, cand_words, part, part_words)


class PeerComm:
    """This rank's symmetric buffer, the peers' mapped addresses, and the three collectives that use them."""

    def __init__(self, ps: ParallelState, regions: Regions):
        import torch.distributed._symmetric_memory as symm_mem

        from dcpserve.kernels import p2p as kernels

        self.kernels = kernels
        self.regions = regions
        group = ps.dcp_group
        with warnings.catch_warnings():  # needed on torch 2.11, deprecated (and a no-op) later
            warnings.simplefilter("ignore")
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(group.group_name)
        self.buf = symm_mem.empty(regions.total, dtype=torch.int32, device=ps.device)
        self.buf.zero_()  # the counters must start at 0 on every rank before any peer signals
        handle = symm_mem.rendezvous(self.buf, group.group_name)
        width = kernels.peer_width(ps.dcp_size)
        ptrs = list(handle.buffer_ptrs) + [0] * (width - ps.dcp_size)
        bases = torch.tensor(ptrs, dtype=torch.int64, device=ps.device)
        self.table = kernels.PeerTable(bases, ps.dcp_rank, ps.dcp_size)
        self._handle = handle  # keeps the peers' mappings alive
        torch.cuda.synchronize(ps.device)
        dist.barrier(group=ps.cpu_group)

    # -- the collectives; each returns None when the batch does not fit (callers then use NCCL) ---------
    def gather_heads(self, q: torch.Tensor) -> torch.Tensor | None:
        """[B, H, D] -> [B, d*H, D], heads in DCP-rank order."""
        b, h, dim = q.shape
        out = self._gather(q.reshape(b, -1), self.regions.q, self.regions.q_words)
        return None if out is None else out.view(b, -1, dim)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B, k] -> [B, d*k]: every rank's rows side by side, in DCP-rank order."""
        out = self._gather(x, self.regions.cand, self.regions.cand_words)
        return None if out is None else out.view(x.shape[0], -1)

    def _gather(self, x: torch.Tensor, region: int, words: int) -> torch.Tensor | None:
        w = x.contiguous().view(torch.int32)
        if w.numel() > words:
            return None
        out = torch.empty(w.shape[0], self.table.world, w.shape[1], dtype=torch.int32, device=x.device)
        self.kernels.p2p_gather(w, out, self.table, region)
        return out.view(x.dtype)

    def partials(self, b: int, heads: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the attention kernel should write this rank's partials (out [B, d*H, V], LSE [B, d*H] fp32)
        so that `merge` reads them in place; None when they do not fit."""
        dh = self.table.world * heads
        if b * dh * (v_dim + 1) > self.regions.part_words:
            return None
        f = self.buf.view(torch.float32)
        at = self.regions.part
        out = f[at : at + b * dh * v_dim].view(b, dh, v_dim)
        lse = f[at + b * dh * v_dim : at + b * dh * (v_dim + 1)].view(b, dh)
        return out, lse

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor | None:
        """This rank's heads of the group's merged attention [B, H, V] fp32; out/lse are the partials
        (copied into the PART region unless the kernel already wrote them there). Rewriting PART is safe only
        after another p2p collective since the previous merge (a layer's query gather): until a peer has
        entered that one, it may still be reading this rank's PART."""
        b, dh, v = out.shape
        h = dh // self.table.world
        dest = self.partials(b, h, v)
        if dest is None:
            return None
        if out.data_ptr() != dest[0].data_ptr():
            dest[0].copy_(out)
        if lse.data_ptr() != dest[1].data_ptr():
            dest[1].copy_(lse)
        merged = torch.empty(b, h, v, dtype=torch.float32, device=out.device)
        merged_lse = torch.empty(b, h, dtype=torch.float32, device=out.device)
        # The views' offsets into the fp32 view of the buffer are the kernel's word offsets (one layout, in
        # `partials`).
        self.kernels.p2p_merge(merged, merged_lse, self.table, dest[0].storage_offset(), dest[1].storage_offset(),
                               b, h)
        return merged
