"""DSA lightning-indexer scoring and top-k selection, for a single rank or a DCP group.

score(t, s) = sum_h w[t, h] * ReLU(scale * q[t, h] . k[s]), causal, top-min(k, len) by (score desc,
position asc). Decode selects through packed int64 keys (`attention/topk.pack_keys`): the backend scores
this rank's tokens straight into keys, takes a local top-k; with the sharded cache the group all-gathers
the k candidate keys per sequence (one int64 each) and every rank takes the same global top-k. Each rank
then keeps the positions it owns as local rows compacted to the front (DESIGN section 2, step 6), never a
-1-padded row of length k.
"""
from __future__ import annotations

from typing import Protocol

import torch

from dcpserve.attention.topk import PAD_POS, key_positions, topk_keys
from dcpserve.distributed.comm import dcp_all_gather
from dcpserve.distributed.p2p import PeerComm
from dcpserve.distributed.parallel import ParallelState
from dcpserve.kv.layout import SlotLayout


class TopK(Protocol):
    def topk(self, scores: torch.Tensor, positions: torch.Tensor, k: int,
             sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [..., n, Hi, Di], w [..., n, Hi] (weights_proj output, already scaled by Hi^-0.5), keys [..., m, Di]
    -> [..., n, m] fp32. Leading dims are a batch (the training model scores whole sequences at once)."""
    s = torch.relu(torch.einsum("...nhd,...md->...nhm", q.float(), keys.float()) * scale)
    return torch.einsum("...nh,...nhm->...nm", w.float(), s)


PREFILL_SCORE_CHUNK = 256


def select_sharded(ps: ParallelState, keys: torch.Tensor, k: int, p2p: PeerComm | None = None) -> torch.Tensor:
    """Exact distributed top-k: keys [B, n] of this rank's tokens -> the global top-k keys [B, k] (any
    order, EMPTY_KEY where fewer exist), the same on every rank. Every member of the global top-k is in its
    owner's local top-k, so the top-k of the union of the local ones is the global one."""
    cand = topk_keys(keys, k)
    if ps.dcp_size == 1:
        return cand
    if p2p is not None and (rows := p2p.gather_rows(cand)) is not None:
        return topk_keys(rows, k)  # [B, d*k]
    gathered = dcp_all_gather(ps, cand)  # [d, B, k]
    return topk_keys(gathered.permute(1, 0, 2).reshape(keys.shape[0], -1), k)


def compact_owned(top: torch.Tensor, block_table: torch.Tensor, layout: SlotLayout, rank: int,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected keys [B, k] (any order, EMPTY_KEY for none) -> (this rank's local rows compacted to the front
    [B, k], in key order, zeros behind; counts [B]). No host sync and no sort: each owned entry's slot is a
    prefix count. Entries behind the count are never read. (Triton: `kernels/indexer.compact_owned`.)"""
    pos_all = key_positions(top)
    valid = pos_all != PAD_POS
    pos = torch.where(valid, pos_all, torch.zeros_like(pos_all))
    owned = valid & (layout.owner_of_position(pos) == rank)
    gps = layout.global_page_slots
    pages = torch.gather(block_table, 1, torch.clamp(pos // gps, max=block_table.shape[1] - 1)).long()
    rows = layout.local_row(pages * gps + pos % gps)
    slot = torch.cumsum(owned.to(torch.int32), dim=1) - 1
    dest = torch.where(owned, slot.long(), torch.full_like(pos, k))  # non-owned go to a spill column
    out = torch.zeros(top.shape[0], k + 1, dtype=rows.dtype, device=top.device)
    out.scatter_(1, dest, rows)
    return out[:, :k], owned.sum(1)


def causal_topk_positions(be: TopK, scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Prefill/extend: scores [n, m] over a whole context (k_pos = 0..m-1) -> [n, k] int32 selected positions
    per query, -1 padded: the causal top-min(k, q_pos+1)."""
    masked = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    _, top = be.topk(masked, k_pos.expand_as(masked).contiguous(), k)
    keep = torch.arange(k, device=top.device)[None, :] < torch.clamp(q_pos + 1, max=k)[:, None]
    return torch.where(keep, top, -1).to(torch.int32)
