"""Multi-head latent attention (absorbed form) with the optional DSA lightning indexer, tensor-parallel over
heads and decode-context-parallel over the KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcpserve.attention.backend import TorchBackend
from dcpserve.attention.dcp import gather_heads, gather_prefix_rows, merge
from dcpserve.attention.indexer import select_sharded
from dcpserve.attention.topk import topk_keys
from dcpserve.config import ModelConfig
from dcpserve.distributed.p2p import PeerComm
from dcpserve.distributed.parallel import ParallelState
from dcpserve.engine.forward_batch import ForwardBatch
from dcpserve.kv.layout import SlotLayout
from dcpserve.kv.pool import KVPool
from dcpserve.loader.reader import Reader
from dcpserve.model.layers import Linear, RMSNorm, column_parallel, row_parallel
from dcpserve.model.rope import RotaryEmbedding


@dataclass
class AttnRuntime:
    """What every attention layer shares: the pool, rope tables, backend and DCP options."""

    pool: KVPool
    rope: RotaryEmbedding
    backend: TorchBackend  # or TritonBackend: same operations
    dcp_comm: str
    p2p: PeerComm | None = None  # peer-mapped buffers when dcp_comm is p2p (distributed/p2p.py)


class Indexer(nn.Module):
    """DSA lightning indexer weights (replicated on every rank: they are small)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = Linear(cfg.hidden_size, self.head_dim)
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim), requires_grad=False)
        self.k_norm_bias = nn.Parameter(torch.zeros(self.head_dim), requires_grad=False)
        # Kept in fp32, as the reference does: these weights scale scores that pick tokens.
        self.weights_proj = nn.Parameter(torch.empty(self.n_heads, cfg.hidden_size), requires_grad=False)
        self.scale = self.head_dim ** -0.5

    def keys(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        k = F.layer_norm(self.wk(x), (self.head_dim,), self.k_norm_weight, self.k_norm_bias, 1e-6)
        r = self.cfg.qk_rope_head_dim
        rope.apply_half(k[:, :r], positions, out=k[:, :r])  # in place: the rest of the row passes through
        return k

    def queries(self, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
                rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(q_lora).view(-1, self.n_heads, self.head_dim)
        r = self.cfg.qk_rope_head_dim
        rope.apply_half(q[..., :r], positions, out=q[..., :r])
        w = F.linear(x.float(), self.weights_proj) * self.n_heads ** -0.5
        return q, w

    def load(self, r: Reader, prefix: str) -> None:
        self.wq_b.load(r, prefix + ".wq_b")
        self.wk.load(r, prefix + ".wk")
        self.k_norm_weight.data = r.get(prefix + ".k_norm.weight", (self.head_dim,))
        self.k_norm_bias.data = r.get(prefix + ".k_norm.bias", (self.head_dim,))
        self.weights_proj.data = r.get(prefix + ".weights_proj.weight", (self.n_heads, self.cfg.hidden_size),
                                       dtype=torch.float32)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState):
        super().__init__()
        self.cfg, self.layer, self.ps = cfg, layer, ps
        self.heads = cfg.num_attention_heads // ps.tp_size
        h, r = cfg.hidden_size, cfg.kv_lora_rank
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(h, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = column_parallel(cfg.q_lora_rank, cfg.num_attention_heads * cfg.qk_head_dim, ps)
        else:
            self.q_proj = column_parallel(h, cfg.num_attention_heads * cfg.qk_head_dim, ps)
        self.kv_a_proj_with_mqa = Linear(h, r + cfg.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(r, 1e-6)
        self.kv_b_proj = column_parallel(r, cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), ps)
        self.o_proj = row_parallel(cfg.num_attention_heads * cfg.v_head_dim, h, ps)
        self.indexer = Indexer(cfg) if cfg.has_indexer else None

    def load(self, rd: Reader, prefix: str) -> None:
        names = ["kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
        names += ["q_a_proj", "q_a_layernorm", "q_b_proj"] if self.cfg.q_lora_rank else ["q_proj"]
        for n in names:
            if n == "kv_b_proj":  # read as W_UK / W_UV by the absorbed attention: always the model dtype
                self.kv_b_proj.load(rd, f"{prefix}.{n}", fp8=False)
            else:
                getattr(self, n).load(rd, f"{prefix}.{n}")
        if self.indexer is not None:
            self.indexer.load(rd, prefix + ".indexer")

    # -- projections -------------------------------------------------------------------------------
    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        w = self.kv_b_proj.weight.view(self.heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]  # W_UK, W_UV: [H, 128, 512]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, out: torch.Tensor) -> None:
        if self.cfg.rope_interleave:
            rope.apply_interleaved(x, positions, out)
        else:
            rope.apply_half(x, positions, out)

    def forward(self, x: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime) -> torch.Tensor:
        c, pool, be = self.cfg, rt.pool, rt.backend
        t, r, n = x.shape[0], c.kv_lora_rank, c.qk_nope_head_dim
        if c.q_lora_rank:
            q_lora = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_lora)
        else:
            q_lora, q = None, self.q_proj(x)
        q = q.view(-1, self.heads, c.qk_head_dim)
        # The latent row and the absorbed query are written in place, the norm and rope straight into their
        # columns: no torch.cat of the pieces.
        kv = self.kv_a_proj_with_mqa(x)
        latent = kv.new_empty(t, r + c.qk_rope_head_dim)
        self.kv_a_layernorm(kv[:, :r], out=latent[:, :r])
        self._rope(kv[:, r:], fb.positions, rt.rope, latent[:, r:])
        be.write_latent(pool.latent[self.layer], fb.write_rows, latent, pool.latent_fmt)
        w_uk, w_uv = self._absorb_weights()
        q_abs = q.new_empty(t, self.heads, r + c.qk_rope_head_dim)  # [T, H, 576]
        torch.bmm(q[..., :n].transpose(0, 1), w_uk, out=q_abs[..., :r].transpose(0, 1))
        self._rope(q[..., n:], fb.positions, rt.rope, q_abs[..., r:])

        idx = None
        if self.indexer is not None:
            k_idx = self.indexer.keys(x, fb.positions, rt.rope)
            be.write_index(pool.index_keys[self.layer], fb.index_write_rows, k_idx, pool.index_fmt)
            # The queries only pick tokens: a batch whose contexts all fit in top-k attends densely.
            if fb.max_ctx_len > c.index_topk:
                idx = (*self.indexer.queries(x, q_lora, fb.positions, rt.rope), k_idx)
        if fb.is_decode:
            o_lat = self._decode(q_abs, fb, rt, idx)
        else:
            o_lat = self._prefill(q_abs, latent, fb, rt, idx)
        o = torch.einsum("thc,hvc->thv", o_lat.to(x.dtype), w_uv)
        return self.o_proj(o.reshape(o.shape[0], -1))

    # -- decode: DCP merge path ----------------------------------------------------------------------
    def _decode(self, q: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime, idx) -> torch.Tensor:
        c, pool, be = self.cfg, rt.pool, rt.backend
        p2p = rt.p2p  # None unless dcp > 1 with --dcp-comm p2p
        qg = gather_heads(self.ps, q, p2p)  # [B, d*H, 576]: the whole group's heads over this rank's tokens
        cache = pool.latent[self.layer]
        # With p2p the kernel writes its partials straight into the buffer the peers' merge reads.
        dest = p2p.partials(qg.shape[0], q.shape[1], c.kv_lora_rank) if p2p is not None else None
        if idx is not None:
            rows, counts = self._decode_select(fb, rt, idx[0], idx[1])
            out, lse = be.sparse_decode(qg, cache, rows, counts, c.softmax_scale, pool.latent_fmt, dest=dest)
        else:
            out, lse = be.decode(qg, cache, fb.block_table, fb.local_lens, fb.layout.page_size, c.softmax_scale,
                                 pool.latent_fmt, fb.max_local_len, dest=dest)
        return merge(self.ps, be, out, lse, rt.dcp_comm, p2p)

    def _decode_select(self, fb: ForwardBatch, rt: AttnRuntime, idx_q, idx_w) -> tuple[torch.Tensor, torch.Tensor]:
        """Compacted local rows [B, k] and counts [B] of the owned tokens in each sequence's global top-k."""
        pool, be, lay, k = rt.pool, rt.backend, fb.layout, self.cfg.index_topk
        cache, scale, fmt = pool.index_keys[self.layer], self.indexer.scale, pool.index_fmt
        if pool.indexer_replicated:
            # Every rank holds every key at its global slot: a paged pool of page size page_size * d in which
            # local token j is position j, so the local top-k is already the global one.
            keys = be.index_keys(idx_q, idx_w, cache, fb.block_table, fb.ctx_lens, SlotLayout(lay.global_page_slots),
                                 0, scale, fmt, fb.max_ctx_len)
            top = topk_keys(keys, k)
        else:
            keys = be.index_keys(idx_q, idx_w, cache, fb.block_table, fb.local_lens, lay, fb.dcp_rank, scale, fmt,
                                 fb.max_local_len)
            top = select_sharded(self.ps, keys, k, rt.p2p)
        return be.compact_owned(top, fb.block_table, lay, fb.dcp_rank, k)

    # -- prefill / extend: gather the cached prefix, own heads, no merge ----------------------------
    def _prefill(self, q: torch.Tensor, latent: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime, idx) -> torch.Tensor:
        c, pool, be = self.cfg, rt.pool, rt.backend
        starts = [s.start for s in fb.seqs]
        prefix = gather_prefix_rows(self.ps, fb.layout, starts, [pool.latent[self.layer][r] for r in fb.own_rows],
                                    fb.prefix_dest)
        # Fresh tokens go through the cache format too, so a later prefix-cache hit sees the same values.
        fresh = pool.roundtrip_latent(latent)
        kv = torch.cat([t for i in range(fb.num_seqs)
                        for t in (pool.latent_fmt.decode(prefix[i]), fresh[fb.seq_tokens(i)])])
        topk_pos = None
        if idx is not None:
            topk_pos = self._prefill_select(fb, rt, idx, starts)
        out, _ = be.prefill(q, kv, fb.cu_new, fb.cu_ctx, fb.positions, c.softmax_scale, pool.latent_fmt, topk_pos,
                            cu_dev=fb.cu_dev)
        return out

    def _prefill_select(self, fb: ForwardBatch, rt: AttnRuntime, idx, starts: list[int]) -> torch.Tensor:
        """[T, k] selected context positions per query (-1 padded): causal top-min(k, pos+1)."""
        idx_q, idx_w, k_idx = idx
        pool, lay = rt.pool, fb.layout
        cache = pool.index_keys[self.layer]
        # Every sequence's whole context as index-cache rows (raw format; row j = position j): the cached
        # prefix from this rank's pool (replicated) or from the group (sharded), then the fresh keys.
        if pool.indexer_replicated:
            dev = fb.positions.device
            prefix = [cache[lay.slots_of(fb.block_table[i].long(), torch.arange(s, device=dev))]
                      for i, s in enumerate(starts)]
        else:
            prefix = gather_prefix_rows(self.ps, lay, starts, [cache[r] for r in fb.own_rows], fb.prefix_dest)
        fresh = pool.index_fmt.encode(k_idx)
        out = torch.empty((fb.positions.shape[0], self.cfg.index_topk), dtype=torch.int32, device=fb.positions.device)
        for i in range(fb.num_seqs):
            sl = fb.seq_tokens(i)
            rows = torch.cat([prefix[i], fresh[sl]])
            out[sl] = rt.backend.index_prefill_topk(idx_q[sl], idx_w[sl], rows, fb.positions[sl], self.indexer.scale,
                                                    pool.index_fmt, self.cfg.index_topk)
        return out
