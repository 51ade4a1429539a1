"""Decode context parallelism around any attention backend (DESIGN section 2).

Decode: all-gather the queries of the DCP group (H*d heads), attend over the tokens this rank owns,
merge the partials by LSE (`ag_rs`: all-gather LSE + reduce-scatter outputs; `a2a`: one all-to-all of
outputs with the LSE packed in; `p2p`: one kernel that reads this rank's heads' partials from the peers'
mapped buffers and merges them, see distributed/p2p.py) and keep this rank's own H heads.
Prefill: gather the cached prefix's rows from the group (ranks hold unequal counts: pad, then restore
global order) and compute this rank's own heads over the whole context, as plain TP does: no merge.
"""
from __future__ import annotations

from typing import Protocol

import torch

from dcpserve.attention.merge import merge_weights, weighted
from dcpserve.distributed.comm import dcp_all_gather, dcp_all_to_all, dcp_reduce_scatter
from dcpserve.distributed.p2p import PeerComm
from dcpserve.distributed.parallel import ParallelState
from dcpserve.kv.layout import SlotLayout


def gather_heads(ps: ParallelState, q: torch.Tensor, p2p: PeerComm | None = None) -> torch.Tensor:
    """[B, H, D] -> [B, d*H, D], heads in DCP-rank order (rank r's heads at chunk r)."""
    if ps.dcp_size == 1:
        return q
    if p2p is not None and (g := p2p.gather_heads(q)) is not None:
        return g
    g = dcp_all_gather(ps, q)  # [d, B, H, D]
    return g.permute(1, 0, 2, 3).reshape(q.shape[0], -1, q.shape[2])


class Merger(Protocol):
    def merge(self, outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def merge_a2a(ps: ParallelState, be: Merger, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """out [B, d*H, V] fp32, lse [B, d*H] -> own heads' merged out [B, H, V]. One collective, one cat
    before it (out and LSE straight into the send layout) and the backend's merge after it."""
    d = ps.dcp_size
    if d == 1:
        return out
    b, dh, v = out.shape

    def per_dest(t: torch.Tensor) -> torch.Tensor:  # [B, d*H, *] -> [d, B, H, *] (a view)
        return t.float().view(b, d, dh // d, t.shape[-1]).transpose(0, 1)

    pack = torch.cat([per_dest(out), per_dest(lse.unsqueeze(-1))], dim=-1)  # contiguous [d, B, H, V+1]
    recv = dcp_all_to_all(ps, pack)  # [d (source rank), B, H, V+1]
    merged, _ = be.merge(recv[..., :v], recv[..., v])
    return merged


def merge_ag_rs(ps: ParallelState, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Same result as merge_a2a with two collectives: all-gather LSE, rescale locally, reduce-scatter."""
    d = ps.dcp_size
    if d == 1:
        return out
    b, dh, v = out.shape
    weights, _ = merge_weights(dcp_all_gather(ps, lse.float()), dim=0)  # [d, B, d*H]
    scaled = weighted(out, weights[ps.dcp_rank])
    return dcp_reduce_scatter(ps, scaled.view(b, d, dh // d, v).transpose(0, 1))


def merge(ps: ParallelState, be: Merger, out: torch.Tensor, lse: torch.Tensor, comm: str,
          p2p: PeerComm | None = None) -> torch.Tensor:
    """`comm`: p2p (one kernel reading the peers' partials in place; batches too large for its buffers take
    a2a), a2a or ag_rs."""
    if ps.dcp_size > 1 and p2p is not None and (merged := p2p.merge(out, lse)) is not None:
        return merged
    return merge_ag_rs(ps, out, lse) if comm == "ag_rs" else merge_a2a(ps, be, out, lse)


def gather_prefix_rows(ps: ParallelState, layout: SlotLayout, starts: list[int], local: list[torch.Tensor],
                       dest: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each rank holds, per sequence i, the rows of its owned positions < starts[i] (ascending). Returns,
    per sequence, all `starts[i]` rows in global position order. Rows may be raw storage bytes.
    dest[i] = layout.gather_order(starts[i]) on the rows' device (ForwardBatch.prefix_dest)."""
    if ps.dcp_size == 1 or not any(starts):
        # No cached prefix anywhere in the batch (a first chunk): every rank sees the same plan, so all skip
        # the collective together. This is most prefill steps; the gather's host work is not free.
        return local
    d = ps.dcp_size
    counts = [[layout.local_count(s, o) for s in starts] for o in range(d)]
    totals = [sum(c) for c in counts]
    width = local[0].shape[1:] if local else ()
    ref = local[0]
    # Rows past a rank's total are padding: sent, never read.
    buf = torch.empty((max(max(totals), 1),) + tuple(width), dtype=ref.dtype, device=ref.device)
    mine = torch.cat(local) if local else buf[:0]
    buf[: mine.shape[0]] = mine
    allbuf = dcp_all_gather(ps, buf)  # [d, maxT, ...]
    out = []
    offsets = [0] * d
    for i, s in enumerate(starts):
        arrived = torch.cat([allbuf[o, offsets[o] : offsets[o] + counts[o][i]] for o in range(d)])
        for o in range(d):
            offsets[o] += counts[o][i]
        full = torch.empty((s,) + tuple(width), dtype=ref.dtype, device=ref.device)
        full[dest[i]] = arrived
        out.append(full)
    return out
