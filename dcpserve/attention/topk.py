"""Deterministic top-k for the DSA indexer, and its exact distributed form (DESIGN section 2, step 6).

Order: higher score first, then lower global position. Under this total order the top-k set is unique, so
every DCP size selects the same tokens. Distributed: each rank takes its local top-k under the same order;
every member of the global top-k is in its owner's local top-k, so the top-k of the union of the local
candidates is the global top-k.
"""
from __future__ import annotations

import torch

# Positions travel as int64 beside the scores; padding candidates carry this position and a -inf score.
PAD_POS = torch.iinfo(torch.int64).max


def ordered_topk(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` along the last dim by (score desc, position asc). Returns (scores, positions), sorted.

    scores: [..., n] (invalid entries -inf), positions: [..., n] int64. `k` may exceed n (result padded
    with -inf / PAD_POS)."""
    n = scores.shape[-1]
    if k > n:
        pad = k - n
        shape = scores.shape[:-1] + (pad,)
        # torch.cat, not F.pad: F.pad routes the fill value through a float, turning PAD_POS into INT64_MIN.
        scores = torch.cat([scores, scores.new_full(shape, float("-inf"))], dim=-1)
        positions = torch.cat([positions, positions.new_full(shape, PAD_POS)], dim=-1)
    # Two stable sorts: by position, then by score; equal scores keep ascending position order.
    pos_order = torch.sort(positions, dim=-1, stable=True).indices
    s1 = torch.gather(scores, -1, pos_order)
    p1 = torch.gather(positions, -1, pos_order)
    score_order = torch.sort(s1, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(s1, -1, score_order), torch.gather(p1, -1, score_order)
