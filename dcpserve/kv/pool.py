"""Per-rank KV pools (latent MLA cache and DSA indexer key cache) and the capacity math that sizes them.

The engine allocates with `KVPool` and sizes it with `plan_kv`; the `capacity` CLI calls the same
`plan_kv`, so the numbers it prints are the ones the engine gets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dcpserve.config import ModelConfig
from dcpserve.kv.formats import IndexKeyFormat, LatentFormat
from dcpserve.kv.layout import SlotLayout


def cache_formats(cfg: ModelConfig, kv_cache_dtype: str, model_dtype: torch.dtype) -> tuple[LatentFormat, IndexKeyFormat | None]:
    fp8 = kv_cache_dtype == "fp8_e4m3"
    store = torch.bfloat16 if kv_cache_dtype == "bf16" else model_dtype
    lat = LatentFormat(cfg.kv_lora_rank, cfg.qk_rope_head_dim, fp8, store if not fp8 else model_dtype)
    idx = IndexKeyFormat(cfg.index_head_dim, fp8, store if not fp8 else model_dtype) if cfg.has_indexer else None
    return lat, idx


@dataclass(frozen=True)
class KVPlan:
    num_pages: int  # global pages; each rank holds num_pages * page_size latent rows
    tokens: int  # global token capacity = num_pages * page_size * dcp
    bytes_per_rank: int
    latent_bytes_per_token_per_rank: float  # per layer, averaged over tokens
    index_bytes_per_token_per_rank: float


def plan_kv(cfg: ModelConfig, layout: SlotLayout, num_layers: int, kv_cache_dtype: str, model_dtype: torch.dtype,
            indexer_mode: str, mem_bytes: int) -> KVPlan:
    """Largest number of global pages whose caches fit in `mem_bytes` on one rank."""
    lat, idx = cache_formats(cfg, kv_cache_dtype, model_dtype)
    p, d = layout.page_size, layout.dcp
    per_page = p * lat.row_bytes  # latent rows a rank holds per global page
    idx_rows_per_page = 0
    if idx is not None:
        idx_rows_per_page = p * d if indexer_mode == "replicated" else p
        per_page += idx_rows_per_page * idx.row_bytes
    per_page *= num_layers
    num_pages = max(int(mem_bytes // per_page), 0)
    tokens = num_pages * p * d
    return KVPlan(
        num_pages=num_pages,
        tokens=tokens,
        bytes_per_rank=num_pages * per_page,
        latent_bytes_per_token_per_rank=lat.row_bytes / d,
        index_bytes_per_token_per_rank=(idx_rows_per_page * idx.row_bytes / (p * d)) if idx else 0.0,
    )


class KVPool:
    """One rank's caches. Row `dummy_row` (the last) absorbs writes of tokens this rank does not own, so a
    write never needs a data-dependent filter (graph-safe)."""

    def __init__(self, cfg: ModelConfig, layout: SlotLayout, num_pages: int, num_layers: int, kv_cache_dtype: str,
                 model_dtype: torch.dtype, indexer_mode: str, device: torch.device):
        self.layout = layout
        self.num_pages = num_pages
        self.latent_fmt, self.index_fmt = cache_formats(cfg, kv_cache_dtype, model_dtype)
        self.indexer_replicated = indexer_mode == "replicated"
        self.rows = num_pages * layout.page_size
        self.dummy_row = self.rows
        self.latent = [self.latent_fmt.empty(self.rows + 1, device) for _ in range(num_layers)]
        self.index_rows = self.rows * (layout.dcp if self.indexer_replicated else 1)
        self.index_dummy_row = self.index_rows
        self.index_keys = (
            [self.index_fmt.empty(self.index_rows + 1, device) for _ in range(num_layers)] if self.index_fmt else []
        )

    def roundtrip_latent(self, kv: torch.Tensor) -> torch.Tensor:
        """What a row reads back as after a write: attention over fresh tokens sees exactly what a later
        step (or a prefix-cache hit) will read from the cache."""
        return self.latent_fmt.decode(self.latent_fmt.encode(kv))

