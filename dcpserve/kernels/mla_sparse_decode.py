"""Sparse MLA decode (DSA) over compacted local row lists, returning the LSE.

Inputs:
  q       [B, Hq, kv_lora_rank + rope_dim] bf16/fp16/fp32 absorbed query (latent part, then rope part).
  cache   one layer's latent pool, as in `mla_decode` (bf16/fp16/fp32 rows or fp8 "656 B" uint8 rows).
  rows    int32 [B, kmax]: pool rows of the keys selected for query b that this rank owns, compacted to the
          front; only rows[b, :counts[b]] are valid. Entries past the count (garbage, -1, ...) are never read.
  counts  int32 [B].
Outputs: out fp32 [B, Hq, kv_lora_rank], lse fp32 [B, Hq] (natural log); counts == 0 -> out 0, lse -inf.

Work is proportional to counts[b], not kmax: every program's loop bound comes from the count (DCP hands
each rank about k/d rows; padding to k would multiply the attention work by d).

A compacted row list is a block table of one-row pages and its count a sequence length, so sparse decode is
`mla_decode` at page size 1: the same kernels (the Hopper Gluon one for a bf16 or fp8 cache of the DeepSeek
dims, the portable Triton one elsewhere), the same split-KV over each query's own count, the same merge.
Entries past a count are never loaded, as block-table entries past a length are not.

Performance model: at batch 128, 128 heads, k = 2048 this is 128*128*2048*2*(576+512) = 73 GFLOP over
302 MB (bf16) / 172 MB (fp8) of gathered rows: ~240 / 420 FLOP/B, firmly compute-bound on H100/H200, like
dense decode at 128 heads. Measured (1x H200, `python -m dcpserve.bench.kernels --sparse-only`, docs/PERF.md
section 2), batch 128, 128 heads, Triton -> Hopper kernel: k = 2048 0.409 -> 0.212 ms (178 -> 345 TFLOP/s)
bf16, 0.445 -> 0.262 ms (164 -> 279) fp8; k = 512 (a DCP4 rank) 0.125 -> 0.073 ms bf16. Predicted from the
dense kernel's ~390 TFLOP/s: 0.19 ms; the rest is the per-key row gather (no contiguous pages) and shorter
loops. (The Triton column was a separate copy of the portable kernel's loop, now folded into it.)
"""
from __future__ import annotations

import torch

from dcpserve.kernels._common import TileConfig, attention_fp32
from dcpserve.kernels.mla_decode import decode_rows, mla_decode


def mla_sparse_decode(q: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                      scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool,
                      num_splits: int | None = None, config: TileConfig | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out fp32 [B, Hq, kv_lora_rank], lse fp32 [B, Hq]). num_splits defaults to a choice from B
    and kmax (= rows.shape[1], a static bound, so no device sync). `out`: optional contiguous (out, lse)
    tensors of those shapes to write into. `config` forces the portable kernel with that tile (as in
    `mla_decode`)."""
    if rows.dim() != 2 or rows.shape[0] != q.shape[0] or rows.stride(1) != 1:
        raise ValueError("rows must be [B, kmax] with contiguous last dim")
    return mla_decode(q, cache, rows, counts, 1, scale, kv_lora_rank, rope_dim, fp8, num_splits=num_splits,
                      max_len=rows.shape[1], config=config, out=out)


def mla_sparse_decode_ref(q: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                          scale: float, kv_lora_rank: int, rope_dim: int, fp8: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: per query, dequantize its first counts[b] rows and attend in fp32."""
    b, n_heads, _ = q.shape
    out = torch.zeros(b, n_heads, kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((b, n_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(counts[i])
        if n == 0:
            continue
        kv = decode_rows(cache, rows[i, :n], kv_lora_rank, rope_dim, fp8)
        o, l = attention_fp32(q[i : i + 1], kv, kv_lora_rank, scale)
        out[i], lse[i] = o[0], l[0]
    return out, lse
