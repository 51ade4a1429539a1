"""Multi-head latent attention (absorbed form) with the optional DSA lightning indexer, tensor-parallel over
heads and decode-context-parallel over the KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcpserve.attention.backend import AttentionBackend
from dcpserve.attention.dcp import gather_heads, gather_prefix_rows, merge
from dcpserve.attention.indexer import causal_topk_mask, decode_select_sharded, index_scores
from dcpserve.attention.topk import ordered_topk
from dcpserve.config import ModelConfig
from dcpserve.distributed.parallel import ParallelState
from dcpserve.engine.forward_batch import ForwardBatch
from dcpserve.kv.pool import KVPool
from dcpserve.loader.reader import Reader
from dcpserve.model.layers import Linear, RMSNorm, column_parallel, row_parallel
from dcpserve.model.rope import RotaryEmbedding


@dataclass
class AttnRuntime:
    """What every attention layer shares: the pool, rope tables, backend and DCP options."""

    pool: KVPool
    rope: RotaryEmbedding
    backend: AttentionBackend
    dcp_comm: str


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
        return torch.cat([rope.apply_half(k[:, :r], positions), k[:, r:]], dim=-1)

    def queries(self, x: torch.Tensor, q_lora: torch.Tensor, positions: torch.Tensor,
                rope: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.wq_b(q_lora).view(-1, self.n_heads, self.head_dim)
        r = self.cfg.qk_rope_head_dim
        q = torch.cat([rope.apply_half(q[..., :r], positions), q[..., r:]], dim=-1)
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
            getattr(self, n).load(rd, f"{prefix}.{n}")
        if self.indexer is not None:
            self.indexer.load(rd, prefix + ".indexer")

    # -- projections -------------------------------------------------------------------------------
    def _absorb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        w = self.kv_b_proj.weight.view(self.heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]  # W_UK, W_UV: [H, 128, 512]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        return rope.apply_interleaved(x, positions) if self.cfg.rope_interleave else rope.apply_half(x, positions)

    def forward(self, x: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime) -> torch.Tensor:
        c, pool = self.cfg, rt.pool
        if c.q_lora_rank:
            q_lora = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_lora)
        else:
            q_lora, q = None, self.q_proj(x)
        q = q.view(-1, self.heads, c.qk_head_dim)
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], self._rope(q[..., c.qk_nope_head_dim :], fb.positions, rt.rope)
        kv = self.kv_a_proj_with_mqa(x)
        latent = torch.cat([self.kv_a_layernorm(kv[:, : c.kv_lora_rank]),
                            self._rope(kv[:, c.kv_lora_rank :], fb.positions, rt.rope)], dim=-1)
        pool.write_latent(self.layer, fb.write_rows, latent)
        w_uk, w_uv = self._absorb_weights()
        q_abs = torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_pe], dim=-1)  # [T, H, 576]

        idx_q = idx_w = None
        if self.indexer is not None:
            k_idx = self.indexer.keys(x, fb.positions, rt.rope)
            pool.write_index(self.layer, fb.index_write_rows, k_idx)
            idx_q, idx_w = self.indexer.queries(x, q_lora, fb.positions, rt.rope)
        if fb.is_decode:
            o_lat = self._decode(q_abs, fb, rt, idx_q, idx_w)
        else:
            o_lat = self._prefill(q_abs, latent, fb, rt, idx_q, idx_w, k_idx if self.indexer is not None else None)
        o = torch.einsum("thc,hvc->thv", o_lat.to(x.dtype), w_uv)
        return self.o_proj(o.reshape(o.shape[0], -1))

    # -- decode: DCP merge path ----------------------------------------------------------------------
    def _decode(self, q: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime, idx_q, idx_w) -> torch.Tensor:
        c, pool = self.cfg, rt.pool
        qg = gather_heads(self.ps, q)  # [B, d*H, 576]
        rows = fb.own_rows
        if self.indexer is not None and any(s.ctx_len > c.index_topk for s in fb.seqs):
            rows = self._decode_select(fb, rt, idx_q, idx_w)
        outs, lses = [], []
        for i in range(fb.num_seqs):
            kv = pool.read_latent(self.layer, rows[i])
            o, l = rt.backend.attend(qg[i : i + 1], kv, c.kv_lora_rank, c.softmax_scale)
            outs.append(o)
            lses.append(l)
        return merge(self.ps, torch.cat(outs), torch.cat(lses), rt.dcp_comm)

    def _decode_select(self, fb: ForwardBatch, rt: AttnRuntime, idx_q, idx_w) -> list[torch.Tensor]:
        """Local rows of the owned tokens in each sequence's global top-k."""
        c, pool, lay, k = self.cfg, rt.pool, fb.layout, self.cfg.index_topk
        scale = self.indexer.scale
        if pool.indexer_replicated:
            chosen = []
            for i, s in enumerate(fb.seqs):
                pos = torch.arange(s.ctx_len, device=fb.positions.device)
                keys = pool.read_index(self.layer, lay.slots_of(fb.block_tables[i], pos))
                sc = index_scores(idx_q[i : i + 1], idx_w[i : i + 1], keys, scale)
                _, top = ordered_topk(sc, pos.view(1, -1), k)
                top = top[0, : min(k, s.ctx_len)]
                chosen.append(top[lay.owner_of_position(top) == fb.dcp_rank])
        else:
            scores = []
            for i in range(fb.num_seqs):
                keys = pool.read_index(self.layer, fb.own_rows[i])
                scores.append(index_scores(idx_q[i : i + 1], idx_w[i : i + 1], keys, scale)[0])
            chosen = decode_select_sharded(self.ps, scores, fb.own_pos, [s.ctx_len for s in fb.seqs], k)
        return [lay.local_rows_of_positions(fb.block_tables[i], p) for i, p in enumerate(chosen)]

    # -- prefill / extend: gather the cached prefix, own heads, no merge ----------------------------
    def _prefill(self, q: torch.Tensor, latent: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime,
                 idx_q, idx_w, k_idx) -> torch.Tensor:
        c, pool = self.cfg, rt.pool
        starts = [s.start for s in fb.seqs]
        prefix_raw = gather_prefix_rows(self.ps, fb.layout, starts,
                                        [pool.latent[self.layer][r] for r in fb.own_rows])
        idx_prefix = None
        if self.indexer is not None:
            if pool.indexer_replicated:
                idx_prefix = [pool.read_index(self.layer, fb.layout.slots_of(fb.block_tables[i],
                              torch.arange(s, device=fb.positions.device))) for i, s in enumerate(starts)]
            else:
                raw = gather_prefix_rows(self.ps, fb.layout, starts,
                                         [pool.index_keys[self.layer][r] for r in fb.own_rows])
                idx_prefix = [pool.index_fmt.decode(t) for t in raw]
        outs = []
        for i, s in enumerate(fb.seqs):
            sl = fb.seq_tokens(i)
            # Fresh tokens go through the cache format too, so a later prefix-cache hit sees the same values.
            kv = torch.cat([pool.latent_fmt.decode(prefix_raw[i]), pool.roundtrip_latent(latent[sl])])
            q_pos = fb.positions[sl]
            k_pos = torch.arange(s.ctx_len, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]
            if self.indexer is not None and s.ctx_len > c.index_topk:
                keys = torch.cat([idx_prefix[i], pool.roundtrip_index(k_idx[sl])])
                sc = index_scores(idx_q[sl], idx_w[sl], keys, self.indexer.scale)
                mask = causal_topk_mask(sc, q_pos, k_pos, c.index_topk)
            o, _ = rt.backend.attend(q[sl], kv, c.kv_lora_rank, c.softmax_scale, mask)
            outs.append(o)
        return torch.cat(outs)
