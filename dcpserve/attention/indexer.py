"""DSA lightning-indexer scoring and top-k selection, for a single rank or a DCP group.

score(t, s) = sum_h w[t, h] * ReLU(scale * q[t, h] . k[s]), causal, top-min(k, len) by (score desc,
position asc). Decode with the sharded cache: each rank scores the tokens it owns, takes a local top-k,
the group all-gathers (score, position) candidates, and every rank takes the same global top-k and keeps
the positions it owns. With the replicated cache every rank scores every token. Either way the result is
a compacted list of *local* rows per query (DESIGN section 2, step 6), never a -1-padded row of length k.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from dcpserve.attention.topk import PAD_POS
from dcpserve.distributed.comm import dcp_all_gather
from dcpserve.distributed.parallel import ParallelState

if TYPE_CHECKING:
    from dcpserve.engine.forward_batch import ForwardBatch


class TopK(Protocol):
    def topk(self, scores: torch.Tensor, positions: torch.Tensor, k: int,
             sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]: ...


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [..., n, Hi, Di], w [..., n, Hi] (weights_proj output, already scaled by Hi^-0.5), keys [..., m, Di]
    -> [..., n, m] fp32. Leading dims are a batch (the training model scores whole sequences at once)."""
    s = torch.relu(torch.einsum("...nhd,...md->...nhm", q.float(), keys.float()) * scale)
    return torch.einsum("...nh,...nhm->...nm", w.float(), s)


def pack_candidates(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(fp32 scores, int64 positions) -> one int64 tensor [..., 2]: one collective, bit-exact positions."""
    return torch.stack([scores.float().view(torch.int32).long(), positions], dim=-1)


def unpack_candidates(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed[..., 0].int().view(torch.float32), packed[..., 1]


PREFILL_SCORE_CHUNK = 256


def select_sharded(ps: ParallelState, be: TopK, scores: torch.Tensor, local_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Exact distributed top-k: local top-k of this rank's scores, all-gather (score, position) candidates,
    the same global top-k on every rank. Returns positions [B, k] (PAD_POS where fewer exist)."""
    # Only the set matters downstream (compact_owned), so neither top-k sorts its winners.
    cand_s, cand_p = be.topk(scores, local_pos.masked_fill(scores == float("-inf"), PAD_POS), k, sort=False)
    if ps.dcp_size == 1:
        return cand_p
    gathered = dcp_all_gather(ps, pack_candidates(cand_s, cand_p))  # [d, B, k, 2]
    all_s, all_p = unpack_candidates(gathered.permute(1, 0, 2, 3).reshape(scores.shape[0], -1, 2))
    return be.topk(all_s, all_p, k, sort=False)[1]


def compact_owned(top: torch.Tensor, fb: ForwardBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected global positions [B, k] (any order, PAD_POS for none) -> (this rank's local rows compacted to
    the front [B, k], counts [B]). No host sync and no sort: each owned entry's slot is a prefix count.
    Entries behind the count are never read."""
    lay = fb.layout
    valid = top != PAD_POS
    pos = torch.where(valid, top, torch.zeros_like(top))
    owned = valid & (lay.owner_of_position(pos) == fb.dcp_rank)
    gps = lay.global_page_slots
    pages = torch.gather(fb.block_table, 1, torch.clamp(pos // gps, max=fb.block_table.shape[1] - 1)).long()
    rows = lay.local_row(pages * gps + pos % gps)
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
