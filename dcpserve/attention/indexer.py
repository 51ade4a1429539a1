"""DSA lightning-indexer scoring and top-k selection, for a single rank or a DCP group.

score(t, s) = sum_h w[t, h] * ReLU(scale * q[t, h] . k[s]), causal, top-min(k, len) by (score desc,
position asc). Decode with the sharded cache: each rank scores the tokens it owns, takes a local top-k,
the group all-gathers (score, position) candidates, and every rank takes the same global top-k and keeps
the positions it owns. With the replicated cache every rank scores every token. Either way the result is
a compacted list of *local* rows per query (DESIGN section 2, step 6), never a -1-padded row of length k.
"""
from __future__ import annotations

import torch

from dcpserve.attention.topk import PAD_POS, ordered_topk
from dcpserve.distributed.comm import dcp_all_gather
from dcpserve.distributed.parallel import ParallelState


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n, Hi, Di], w [n, Hi] (weights_proj output, already scaled by Hi^-0.5), keys [m, Di] -> [n, m] fp32."""
    s = torch.relu(torch.einsum("nhd,md->nhm", q.float(), keys.float()) * scale)
    return torch.einsum("nh,nhm->nm", w.float(), s)


def pack_candidates(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(fp32 scores, int64 positions) -> one int64 tensor [..., 2]: one collective, bit-exact positions."""
    return torch.stack([scores.float().view(torch.int32).long(), positions], dim=-1)


def unpack_candidates(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed[..., 0].int().view(torch.float32), packed[..., 1]


def decode_select_sharded(ps: ParallelState, scores: list[torch.Tensor], positions: list[torch.Tensor],
                          ctx_lens: list[int], k: int) -> list[torch.Tensor]:
    """Per sequence: this rank's scores [m_i] over its owned positions [m_i]. Returns, per sequence, the
    owned positions in the global top-min(k, ctx_len) (exact; identical on every DCP size)."""
    b = len(scores)
    dev = scores[0].device if b else torch.device("cpu")
    cand_s = torch.full((b, k), float("-inf"), device=dev)
    cand_p = torch.full((b, k), PAD_POS, dtype=torch.long, device=dev)
    for i in range(b):
        s, p = ordered_topk(scores[i].view(1, -1), positions[i].view(1, -1), k)
        cand_s[i], cand_p[i] = s[0], p[0]
    gathered = dcp_all_gather(ps, pack_candidates(cand_s, cand_p))  # [d, B, k, 2]
    all_s, all_p = unpack_candidates(gathered.permute(1, 0, 2, 3).reshape(b, -1, 2))
    top_s, top_p = ordered_topk(all_s, all_p, k)
    out = []
    for i in range(b):
        chosen = top_p[i, : min(k, ctx_lens[i])]
        out.append(chosen[torch.isin(chosen, positions[i])])
    return out


def causal_topk_mask(scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Prefill/extend: scores [n, m] over keys at k_pos (all positions of the context, ascending) ->
    bool [n, m], True where key is among query t's top-min(k, q_pos+1) causal keys."""
    causal = k_pos[None, :] <= q_pos[:, None]
    if k_pos.numel() <= k:
        return causal
    masked = scores.masked_fill(~causal, float("-inf"))
    _, top_p = ordered_topk(masked, k_pos.expand_as(masked).contiguous(), k)
    counts = torch.clamp(q_pos + 1, max=k)
    keep = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    sel = torch.zeros_like(causal)
    # Key positions are 0..m-1 for a full context, so positions index columns directly.
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top_p)
    sel[rows[keep], top_p[keep]] = True
    return sel & causal
