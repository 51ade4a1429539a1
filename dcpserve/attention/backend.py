"""Attention backends: the operations over one rank's paged caches that the model needs, each returning
`(out, lse)` where attention is involved: out [n, heads, kv_lora] fp32 and the natural-log sum-exp of the
scaled scores [n, heads] (-inf and a zero output where a query sees no key). DCP (query gather, merge,
distributed top-k) lives outside the backends (attention/dcp.py), so every backend gets it for free.

`TorchBackend` is the reference (plain PyTorch, any device); `TritonBackend` runs the Triton kernels of
`dcpserve/kernels/`, each of which is tested against the torch reference beside it.
"""
from __future__ import annotations

import torch

from dcpserve.attention.indexer import (
    PREFILL_SCORE_CHUNK,
    causal_topk_positions,
    compact_owned,
    index_scores,
)
from dcpserve.attention.merge import merge_partials
from dcpserve.attention.topk import PAD_POS, pack_keys, packed_topk
from dcpserve.kv.formats import IndexKeyFormat, LatentFormat
from dcpserve.kv.layout import SlotLayout


def attend(q: torch.Tensor, kv: torch.Tensor, v_dim: int, scale: float,
           mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention of q [n, H, D] over rows kv [m, D] (values = first v_dim columns), mask [n, m] bool."""
    n, h, _ = q.shape
    if kv.shape[0] == 0:
        return q.new_zeros(n, h, v_dim, dtype=torch.float32), q.new_full((n, h), float("-inf"), dtype=torch.float32)
    kvf = kv.float()
    scores = torch.einsum("nhd,md->nhm", q.float(), kvf) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.einsum("nhm,mv->nhv", p, kvf[:, :v_dim]), lse


SELECTED_BLOCK_ELEMS = 1 << 24  # bounds the gathered [queries, k, D] block of attend_selected (64 MB fp32)


def attend_selected(q: torch.Tensor, kv: torch.Tensor, sel: torch.Tensor, q_pos: torch.Tensor, v_dim: int,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention: query t of q [n, H, D] over the rows kv[sel[t]] (sel [n, k], unique per row, -1
    padded; entries past q_pos[t] are masked too, so the result is `attend` with mask causal & selected).
    Gathers the k selected rows per query instead of scoring the whole context: O(n * k), not O(n * m)."""
    n, h, _ = q.shape
    k = sel.shape[1]
    out = torch.zeros(n, h, v_dim, dtype=torch.float32, device=q.device)
    lse = torch.full((n, h), float("-inf"), dtype=torch.float32, device=q.device)
    if kv.shape[0] == 0 or k == 0:
        return out, lse
    step = max(1, SELECTED_BLOCK_ELEMS // (k * kv.shape[1]))
    for a in range(0, n, step):
        b = min(a + step, n)
        s = sel[a:b].long()
        ok = (s >= 0) & (s <= q_pos[a:b, None])
        rows = kv[s.clamp(0, kv.shape[0] - 1)].float()  # [c, k, D]
        scores = torch.einsum("chd,ckd->chk", q[a:b].float(), rows) * scale
        scores = scores.masked_fill(~ok[:, None, :], float("-inf"))
        lse[a:b] = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - torch.where(torch.isfinite(lse[a:b]), lse[a:b], torch.zeros_like(lse[a:b]))[..., None])
        out[a:b] = torch.einsum("chk,ckv->chv", p, rows[..., :v_dim])
    return out, lse


def paged_rows(block_table: torch.Tensor, lens: torch.Tensor, page_size: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [B, max_len] of tokens 0..max_len-1 of each sequence in a paged pool, and their validity."""
    j = torch.arange(max_len, device=block_table.device)
    valid = j[None, :] < lens[:, None]
    page_idx = torch.clamp(j // page_size, max=max(block_table.shape[1] - 1, 0))
    pages = block_table.long()[:, page_idx] if block_table.shape[1] else torch.zeros_like(valid, dtype=torch.long)
    return torch.where(valid, pages * page_size + j % page_size, torch.zeros_like(pages)), valid


def _into(res: tuple[torch.Tensor, torch.Tensor], dest: tuple[torch.Tensor, torch.Tensor] | None):
    if dest is None:
        return res
    dest[0].copy_(res[0])
    dest[1].copy_(res[1])
    return dest


class TorchBackend:
    name = "torch"
    attend = staticmethod(attend)

    def write_latent(self, cache: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor, fmt: LatentFormat) -> None:
        cache[rows] = fmt.encode(kv)

    def write_index(self, cache: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, fmt: IndexKeyFormat) -> None:
        cache[rows] = fmt.encode(k)

    def decode(self, q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor,
               page_size: int, scale: float, fmt: LatentFormat, max_len: int,
               dest: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense paged decode: q [B, Hq, D]; sequence b's first lens[b] tokens of this pool. `dest`: optional
        (out, lse) tensors to write the result into (the p2p merge's buffer)."""
        rows, valid = paged_rows(block_table, lens, page_size, max_len)
        return _into(self._attend_rows(q, cache, rows, valid, scale, fmt), dest)

    def sparse_decode(self, q: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      scale: float, fmt: LatentFormat,
                      dest: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hq, D] over the first counts[b] entries of rows [B, kmax] (the rest is never read)."""
        valid = torch.arange(rows.shape[1], device=rows.device)[None, :] < counts[:, None]
        return _into(self._attend_rows(q, cache, torch.where(valid, rows.long(), 0), valid, scale, fmt), dest)

    def _attend_rows(self, q, cache, rows, valid, scale, fmt):
        outs, lses = [], []
        for b in range(q.shape[0]):
            kv = fmt.decode(cache[rows[b][valid[b]]])
            o, l = attend(q[b : b + 1], kv, fmt.kv_lora_rank, scale)
            outs.append(o)
            lses.append(l)
        if not outs:
            return q.new_zeros(0, q.shape[1], fmt.kv_lora_rank, dtype=torch.float32), q.new_zeros(0, q.shape[1])
        return torch.cat(outs), torch.cat(lses)

    def prefill(self, q: torch.Tensor, kv: torch.Tensor, cu_q: list[int], cu_k: list[int], q_pos: torch.Tensor,
                scale: float, fmt: LatentFormat, topk_pos: torch.Tensor | None,
                cu_dev: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Varlen prefill: sequence i's queries q[cu_q[i]:cu_q[i+1]] over its context rows kv[cu_k[i]:cu_k[i+1]]
        (positions 0..ctx-1, already decoded), causal on q_pos; with topk_pos [T, k] (-1 padded) only the
        selected positions. cu_dev: cu_q and cu_k as int32 device tensors, where the caller has them (kernels
        take those; this loop reads the lists)."""
        outs, lses = [], []
        for i in range(len(cu_q) - 1):
            qs = slice(cu_q[i], cu_q[i + 1])
            ctx = kv[cu_k[i] : cu_k[i + 1]]
            if topk_pos is not None:
                o, l = attend_selected(q[qs], ctx, topk_pos[qs], q_pos[qs], fmt.kv_lora_rank, scale)
            else:
                k_pos = torch.arange(ctx.shape[0], device=q.device)
                o, l = attend(q[qs], ctx, fmt.kv_lora_rank, scale, k_pos[None, :] <= q_pos[qs, None])
            outs.append(o)
            lses.append(l)
        return torch.cat(outs), torch.cat(lses)

    def index_scores(self, q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                     lens: torch.Tensor, page_size: int, scale: float, fmt: IndexKeyFormat, max_len: int) -> torch.Tensor:
        """Indexer scores [B, max_len] of one query per sequence against its paged keys; -inf past lens[b]."""
        rows, valid = paged_rows(block_table, lens, page_size, max_len)
        keys = fmt.decode(cache[rows.reshape(-1)]).float().view(*rows.shape, -1)  # [B, L, Di]
        s = torch.relu(torch.einsum("bhd,bld->bhl", q.float(), keys) * scale)
        return torch.einsum("bh,bhl->bl", w.float(), s).masked_fill(~valid, float("-inf"))

    def index_keys(self, q: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                   lens: torch.Tensor, layout: SlotLayout, rank: int, scale: float, fmt: IndexKeyFormat,
                   max_len: int) -> torch.Tensor:
        """Decode top-k keys [B, max_len] (`pack_keys` of score and global position) of the tokens this rank's
        pool holds, laid out as `layout` says for `rank`; EMPTY_KEY past lens[b]."""
        scores = self.index_scores(q, w, cache, block_table, lens, layout.page_size, scale, fmt, max_len)
        # PAD_POS past lens[b] (where the score is -inf): those pack to EMPTY_KEY, as the Triton kernel writes.
        return pack_keys(scores, layout.local_position_table(rank, lens, max_len, PAD_POS))

    def index_prefill_topk(self, q: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, q_pos: torch.Tensor,
                           scale: float, fmt: IndexKeyFormat, k: int) -> torch.Tensor:
        """Prefill/extend selection of one sequence: queries q [n, Hi, Di] (weights w [n, Hi]) at global
        positions q_pos over its whole context, whose index keys are `rows` [m, ...] in cache format (row j is
        position j). Returns int32 [n, k]: the causal top-min(k, q_pos + 1) positions in top-k order, -1 padded."""
        keys = fmt.decode(rows)
        k_pos = torch.arange(keys.shape[0], device=keys.device)
        out = torch.empty(q.shape[0], k, dtype=torch.int32, device=q.device)
        for a in range(0, q.shape[0], PREFILL_SCORE_CHUNK):  # bounds the [n, Hi, m] fp32 intermediate
            b = min(a + PREFILL_SCORE_CHUNK, q.shape[0])
            out[a:b] = causal_topk_positions(self, index_scores(q[a:b], w[a:b], keys, scale), q_pos[a:b], k_pos, k)
        return out

    def compact_owned(self, top: torch.Tensor, block_table: torch.Tensor, layout: SlotLayout, rank: int,
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected keys rank `rank` owns as local rows, compacted to the front, and their counts."""
        return compact_owned(top, block_table, layout, rank, k)

    def merge(self, outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSE merge of partials outs [n, ..., V], lses [n, ...] -> (out fp32 [..., V], lse [...])."""
        return merge_partials(outs, lses)

    def topk(self, scores: torch.Tensor, positions: torch.Tensor, k: int,
             sort: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k set by (score desc, position asc); sorted in that order unless `sort=False` (then any order)."""
        return packed_topk(scores, positions, k, sort)


def get_backend(name: str):
    if name == "torch":
        return TorchBackend()
    if name == "triton":
        from dcpserve.attention.triton_backend import TritonBackend

        return TritonBackend()
    raise ValueError(f"unknown attention backend {name!r}")
