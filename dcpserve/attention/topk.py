"""Deterministic top-k for the DSA indexer, and its exact distributed form (DESIGN section 2, step 6).

Order: higher score first, then lower global position. Under this total order the top-k set is unique, so
every DCP size selects the same tokens. Distributed: each rank takes its local top-k under the same order;
every member of the global top-k is in its owner's local top-k, so the top-k of the union of the local
candidates is the global top-k.

Decode selects through packed keys: one int64 per (score, position) whose integer order is the top-k order, so a
plain `torch.topk` on the keys is the ordered top-k, candidates travel between ranks as one int64 each, and
the position comes back from the key's low bits (no gather of scores or positions).
"""
from __future__ import annotations

import torch

# Positions travel as int64 beside the scores; padding candidates carry this position and a -inf score.
PAD_POS = torch.iinfo(torch.int64).max


def _pad_to_k(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append -inf / PAD_POS entries up to k. torch.cat, not F.pad: F.pad routes its fill value through a
    float, which turns PAD_POS into INT64_MIN."""
    n = scores.shape[-1]
    if k <= n:
        return scores, positions
    shape = scores.shape[:-1] + (k - n,)
    return (torch.cat([scores, scores.new_full(shape, float("-inf"))], dim=-1),
            torch.cat([positions, positions.new_full(shape, PAD_POS)], dim=-1))


def ordered_topk(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` along the last dim by (score desc, position asc). Returns (scores, positions), sorted.
    The order's definition (two stable sorts); `packed_topk` computes the same faster.

    scores: [..., n] (invalid entries -inf), positions: [..., n] int64. `k` may exceed n (result padded
    with -inf / PAD_POS)."""
    scores, positions = _pad_to_k(scores, positions, k)
    # Two stable sorts: by position, then by score; equal scores keep ascending position order.
    pos_order = torch.sort(positions, dim=-1, stable=True).indices
    s1 = torch.gather(scores, -1, pos_order)
    p1 = torch.gather(positions, -1, pos_order)
    score_order = torch.sort(s1, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(s1, -1, score_order), torch.gather(p1, -1, score_order)


# Positions up to MAX_POSITION fit a key's low 32 bits (2^32 - 1 - position > 0); 0 there marks "no token".
MAX_POSITION = 2**32 - 2


def pack_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One int64 per entry whose signed order is (score asc, position desc): topk(largest) = our order.

    High 32 bits: the fp32 bits mapped monotonically to int32 (negatives get their magnitude bits flipped;
    -0.0 ties with +0.0, one NaN bit pattern sorting first, as in a float sort). Low 32 bits:
    2^32 - 1 - position for real positions, 0 for PAD_POS (last among equal scores)."""
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)
    s = torch.where(torch.isnan(s), torch.full_like(s, float("nan")), s)
    bits = s.view(torch.int32).long()
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    pos = positions.long()
    low = torch.where(pos == PAD_POS, torch.zeros_like(pos), (2**32 - 1) - pos)
    return (mono << 32) | low


EMPTY_KEY = int(pack_keys(torch.tensor([float("-inf")]), torch.tensor([PAD_POS]))[0])  # no token: sorts last


def key_positions(keys: torch.Tensor) -> torch.Tensor:
    """The positions packed in `keys` (PAD_POS where the key holds none)."""
    low = keys & 0xFFFFFFFF
    return torch.where(low == 0, torch.full_like(keys, PAD_POS), (2**32 - 1) - low)


def topk_keys(keys: torch.Tensor, k: int, sort: bool = False) -> torch.Tensor:
    """The k largest keys along the last dim, in no particular order (`sort`: largest first); EMPTY_KEY-padded
    when k > n."""
    n = keys.shape[-1]
    if k > n:
        keys = torch.cat([keys, keys.new_full(keys.shape[:-1] + (k - n,), EMPTY_KEY)], dim=-1)
    if k == keys.shape[-1] and not sort:
        return keys
    return torch.topk(keys, k, dim=-1, largest=True, sorted=sort).values


def top_positions(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Packed keys [..., n] -> int64 [..., k]: the positions of the k largest in top-k order (score desc,
    position asc), -1 where a row holds fewer than k real entries (EMPTY_KEY marks none)."""
    pos = key_positions(topk_keys(keys, k, sort=True))
    return torch.where(pos == PAD_POS, torch.full_like(pos, -1), pos)


def packed_topk(scores: torch.Tensor, positions: torch.Tensor, k: int,
                sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`ordered_topk`'s result from one `torch.topk` over packed keys instead of two full sorts; with
    `sort=False` the same set in no particular order. Positions: 0..MAX_POSITION or PAD_POS."""
    scores, positions = _pad_to_k(scores, positions.long(), k)
    idx = torch.topk(pack_keys(scores, positions), k, dim=-1, largest=True, sorted=sort).indices
    # Values come from the inputs themselves (not the keys), so they are returned bit for bit.
    return torch.gather(scores, -1, idx), torch.gather(positions, -1, idx)
