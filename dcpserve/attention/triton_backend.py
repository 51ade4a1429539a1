"""The Triton backend: the same operations as `TorchBackend`, run by the kernels of `dcpserve/kernels/`
(each tested against the torch reference beside it). Shapes the kernels do not cover (tiny test models'
indexer heads) fall back to the torch path."""
from __future__ import annotations

import torch

from dcpserve.attention.backend import TorchBackend
from dcpserve.attention.topk import top_positions
from dcpserve.kernels.indexer import compact_owned, indexer_scores
from dcpserve.kernels.kv_write import write_index_keys, write_latent
from dcpserve.kernels.merge import merge_lse
from dcpserve.kernels.mla_decode import mla_decode
from dcpserve.kernels.mla_prefill import mla_prefill
from dcpserve.kernels.mla_sparse_decode import mla_sparse_decode
from dcpserve.kv.formats import IndexKeyFormat, LatentFormat
from dcpserve.kv.layout import SlotLayout

PREFILL_KEY_BYTES = 256 << 20  # packed keys a prefill selection holds at once ([queries, context] int64)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _indexer_fits(q: torch.Tensor, fmt: IndexKeyFormat) -> bool:
    hi, di = q.shape[1], q.shape[2]
    return hi >= 16 and _pow2(hi) and _pow2(di) and di >= (64 if fmt.fp8 else 16)


class TritonBackend(TorchBackend):
    name = "triton"

    def write_latent(self, cache: torch.Tensor, rows: torch.Tensor, kv: torch.Tensor, fmt: LatentFormat) -> None:
        write_latent(cache, rows, kv, fmt.fp8, fmt.kv_lora_rank, fmt.rope_dim)

    def write_index(self, cache: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, fmt: IndexKeyFormat) -> None:
        write_index_keys(cache, rows, k, fmt.fp8)

    def decode(self, q, cache, block_table, lens, page_size, scale, fmt: LatentFormat, max_len, dest=None):
        return mla_decode(q, cache, block_table, lens, page_size, scale, fmt.kv_lora_rank, fmt.rope_dim, fmt.fp8,
                          max_len=max_len, out=dest)

    def sparse_decode(self, q, cache, rows, counts, scale, fmt: LatentFormat, dest=None):
        return mla_sparse_decode(q, cache, rows.to(torch.int32), counts.to(torch.int32), scale, fmt.kv_lora_rank,
                                 fmt.rope_dim, fmt.fp8, out=dest)

    def prefill(self, q, kv, cu_q, cu_k, q_pos, scale, fmt: LatentFormat, topk_pos, cu_dev=None):
        # cu_dev: the offsets already on the device (ForwardBatch.cu_dev); copying them here would be a
        # pageable host-to-device copy per layer, each a host sync.
        if cu_dev is None:
            cu_dev = tuple(torch.tensor(c, dtype=torch.int32, device=q.device) for c in (cu_q, cu_k))
        cu_q_t, cu_k_t = cu_dev
        max_q = max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0)
        return mla_prefill(q.contiguous(), kv.contiguous(), cu_q_t, cu_k_t, q_pos.to(torch.int32), scale,
                           fmt.kv_lora_rank, fmt.rope_dim, False, topk_pos, max_q_len=max_q)

    def index_keys(self, q, w, cache, block_table, lens, layout: SlotLayout, rank: int, scale, fmt: IndexKeyFormat,
                   max_len):
        if not _indexer_fits(q, fmt):
            return super().index_keys(q, w, cache, block_table, lens, layout, rank, scale, fmt, max_len)
        return indexer_scores(q.contiguous(), w.float().contiguous(), cache, block_table, lens, layout.page_size,
                              scale, fmt.fp8, max_len=max_len, keys=(layout.interleave, layout.dcp, rank))

    def index_prefill_topk(self, q, w, rows, q_pos, scale, fmt: IndexKeyFormat, k):
        if not _indexer_fits(q, fmt):
            return super().index_prefill_topk(q, w, rows, q_pos, scale, fmt, k)
        # The decode scoring kernel with one "sequence" per query: every query reads the same flat context (one
        # page of m rows, so row j is position j) up to its own position, and writes packed top-k keys with
        # EMPTY_KEY after it. The fp32 [n, Hi, m] scores of the torch path never exist; the context's keys
        # stay in L2 across queries.
        n, m = q.shape[0], rows.shape[0]
        table = torch.zeros(1, 1, dtype=torch.int32, device=q.device).expand(n, 1)
        lens = (q_pos + 1).to(torch.int32)
        out = torch.empty(n, k, dtype=torch.int32, device=q.device)
        step = max(1, PREFILL_KEY_BYTES // (8 * max(m, 1)))  # bounds the [step, m] int64 keys
        for a in range(0, n, step):
            b = min(a + step, n)
            keys = indexer_scores(q[a:b].contiguous(), w[a:b].float().contiguous(), rows, table[a:b], lens[a:b],
                                  max(m, 1), scale, fmt.fp8, max_len=m, keys=(1, 1, 0))
            out[a:b] = top_positions(keys, k)
        return out

    def compact_owned(self, top, block_table, layout: SlotLayout, rank: int, k: int):
        return compact_owned(top, block_table, layout.interleave, layout.dcp, rank, layout.page_size)

    def merge(self, outs, lses):
        return merge_lse(outs, lses)
