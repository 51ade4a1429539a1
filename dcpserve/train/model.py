"""DeepSeek-V3.2 in training form: whole sequences, autograd, no KV cache, no parallelism.

Parameter names are those of a HuggingFace checkpoint, so `state_dict()` is the checkpoint the engine loads.
The math is the engine's (rope, MoE routing and indexer scores are imported from `dcpserve.model` and
`dcpserve.attention`, not re-derived); tests check the logits against transformers' DeepseekV32.

Attention has two modes:
  dense   all causal positions (SDPA), the indexer idle;
  sparse  each query attends only the indexer's causal top-k positions (the same (score desc, position asc)
          order as the engine), computed in the absorbed form over the gathered latent rows, so memory is
          O(T * k), not O(T^2).
The indexer learns by KL to the main attention (DeepSeek-V3.2's recipe): dense mode aligns it with the full
attention distribution, sparse mode with the distribution over its own selection. Its inputs are detached,
so that loss trains the indexer only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dcpserve.attention.backend import TorchBackend
from dcpserve.attention.indexer import causal_topk_positions, index_scores
from dcpserve.config import ModelConfig
from dcpserve.model.moe import route
from dcpserve.model.rope import RotaryEmbedding

SCORE_BLOCK = 1 << 25  # elements of the [rows, Hi, T] indexer score block in one top-k pass


@dataclass
class Aux:
    """What a forward returns besides logits."""

    indexer_kl: torch.Tensor  # mean over layers and sampled rows
    expert_load: list[torch.Tensor]  # tokens per routed expert, per MoE layer (for bias balancing)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def linear(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o, bias=False)


class Indexer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.h, self.d = cfg, cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = linear(cfg.q_lora_rank, self.h * self.d)
        self.wk = linear(cfg.hidden_size, self.d)
        self.k_norm = nn.LayerNorm(self.d, eps=1e-6)
        self.weights_proj = linear(cfg.hidden_size, self.h)

    def project(self, x: torch.Tensor, q_lora: torch.Tensor, pos: torch.Tensor, rope: RotaryEmbedding):
        """(q [B,T,Hi,Di], w [B,T,Hi] fp32, k [B,T,Di]) in fp32, as the engine computes them."""
        b, t, _ = x.shape
        r = self.cfg.qk_rope_head_dim
        q = self.wq_b(q_lora).float().view(b, t, self.h, self.d)
        q = torch.cat([rope.apply_half(q[..., :r], pos), q[..., r:]], dim=-1)
        k = self.k_norm(self.wk(x).float())
        k = torch.cat([rope.apply_half(k[..., :r], pos), k[..., r:]], dim=-1)
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.h ** -0.5
        return q, w, k

    def scores(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B,n,Hi,Di], w [B,n,Hi], k [B,m,Di] -> [B,n,m], the engine's scoring."""
        return index_scores(q, w, k, self.d ** -0.5)

    @torch.no_grad()
    def select(self, q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, topk: int) -> torch.Tensor:
        """Causal top-min(k, pos+1) positions [B, T, k] (-1 padded), in the engine's order."""
        b, t = q.shape[:2]
        be, pos = TorchBackend(), torch.arange(t, device=q.device)
        out = torch.empty(b, t, topk, dtype=torch.long, device=q.device)
        chunk = max(1, SCORE_BLOCK // (b * self.h * t))
        for a in range(0, t, chunk):
            z = min(a + chunk, t)
            s = self.scores(q[:, a:z], w[:, a:z], k[:, :z]).reshape(b * (z - a), z)  # rows of every sequence
            top = causal_topk_positions(be, s, pos[a:z].repeat(b), pos[:z], topk)
            out[:, a:z] = top.view(b, z - a, topk).long()
        return out


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, h = cfg, cfg.hidden_size
        self.cfg, self.heads = cfg, cfg.num_attention_heads
        self.q_a_proj = linear(h, c.q_lora_rank)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, 1e-6)
        self.q_b_proj = linear(c.q_lora_rank, self.heads * c.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(h, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, 1e-6)
        self.kv_b_proj = linear(c.kv_lora_rank, self.heads * (c.qk_nope_head_dim + c.v_head_dim))
        self.o_proj = linear(self.heads * c.v_head_dim, h)
        self.indexer = Indexer(cfg)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        return rope.apply_interleaved(x, pos) if self.cfg.rope_interleave else rope.apply_half(x, pos)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, sparse: bool,
                kl_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B,T,h] -> (out [B,T,h], indexer KL over kl_rows [B,R] (0 when None))."""
        c = self.cfg
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device)[None]  # [1, T]: rope tables broadcast over batch and heads
        q_lora = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(q_lora).view(b, t, self.heads, c.qk_head_dim)
        q_nope, q_pe = q[..., : c.qk_nope_head_dim], self._rope(q[..., c.qk_nope_head_dim :], pos, rope)
        kv = self.kv_a_proj_with_mqa(x)
        lat = self.kv_a_layernorm(kv[..., : c.kv_lora_rank])
        k_pe = self._rope(kv[..., c.kv_lora_rank :], pos, rope)
        w = self.kv_b_proj.weight.view(self.heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        w_uk, w_uv = w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]
        # Absorbed query [B,T,H,r+rope] against latent rows [B,T,r+rope]: one form for both modes.
        q_abs = torch.cat([torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_pe], dim=-1)
        rows = torch.cat([lat, k_pe], dim=-1)
        iq, iw, ik = self.indexer.project(x.detach(), q_lora.detach(), pos, rope)
        if sparse and t > c.index_topk:
            sel = self.indexer.select(iq, iw, ik, c.index_topk)
            o_lat, probs = self._sparse(q_abs, rows, sel)
            o = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)
            kl = self._kl_selected(iq, iw, ik, sel, probs, kl_rows)
        else:
            o = self._dense(q_nope, q_pe, lat, k_pe, w_uk, w_uv)
            kl = self._kl_dense(q_abs, rows, iq, iw, ik, kl_rows)
        return self.o_proj(o.reshape(b, t, -1)), kl

    def _dense(self, q_nope, q_pe, lat, k_pe, w_uk, w_uv) -> torch.Tensor:
        """Causal attention over every position, unabsorbed so SDPA can use a fused kernel. -> [B,T,H,v]."""
        c = self.cfg
        b, t = lat.shape[:2]
        k_nope = torch.einsum("btc,hnc->bthn", lat, w_uk)
        v = torch.einsum("btc,hvc->bthv", lat, w_uv)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, t, self.heads, c.qk_rope_head_dim)], dim=-1).transpose(1, 2)
        pad = c.qk_head_dim - c.v_head_dim  # equal head dims let SDPA pick the flash kernel
        v = F.pad(v, (0, pad)).transpose(1, 2) if pad > 0 else v.transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True, scale=c.softmax_scale)
        return o.transpose(1, 2)[..., : c.v_head_dim]

    def _sparse(self, q_abs: torch.Tensor, rows: torch.Tensor, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over the selected rows only. -> (latent out [B,T,H,r], probs [B,T,H,k])."""
        c = self.cfg
        b, t, k = sel.shape
        g = torch.gather(rows, 1, sel.clamp(min=0).reshape(b, t * k, 1).expand(-1, -1, rows.shape[-1]))
        g = g.view(b, t, k, -1)
        # Under autocast this product runs in bf16: an fp32 copy of g would be [B, T, k, r] floats per layer.
        s = torch.einsum("bthc,btkc->bthk", q_abs, g).float() * c.softmax_scale
        s = s.masked_fill((sel < 0)[:, :, None, :], float("-inf"))
        p = s.softmax(-1)
        return torch.einsum("bthk,btkc->bthc", p.to(g.dtype), g[..., : c.kv_lora_rank]), p

    def _kl_dense(self, q_abs, rows, iq, iw, ik, kl_rows) -> torch.Tensor:
        """KL(main attention, summed over heads and renormalized || softmax of indexer scores) on kl_rows."""
        if kl_rows is None:
            return q_abs.new_zeros((), dtype=torch.float32)
        b, t = rows.shape[:2]
        bi = torch.arange(b, device=rows.device)[:, None]
        with torch.no_grad():
            s = torch.einsum("brhc,btc->brht", q_abs[bi, kl_rows].float(), rows.float()) * self.cfg.softmax_scale
            future = torch.arange(t, device=rows.device)[None, None, :] > kl_rows[:, :, None]
            p = s.masked_fill(future[:, :, None], float("-inf")).softmax(-1).mean(2)  # [B,R,T]
        logits = self.indexer.scores(iq[bi, kl_rows], iw[bi, kl_rows], ik).masked_fill(future, float("-inf"))
        return _kl(p, logits)

    def _kl_selected(self, iq, iw, ik, sel, probs, kl_rows) -> torch.Tensor:
        """The same KL restricted to the selected set S_t (sparse stage)."""
        if kl_rows is None:
            return iq.new_zeros((), dtype=torch.float32)
        b = sel.shape[0]
        bi = torch.arange(b, device=sel.device)[:, None]
        s_rows = sel[bi, kl_rows]  # [B,R,k]
        p = probs[bi, kl_rows].detach().mean(2)  # [B,R,k]
        kg = torch.gather(ik, 1, s_rows.clamp(min=0).reshape(b, -1, 1).expand(-1, -1, ik.shape[-1]))
        kg = kg.view(*s_rows.shape, -1)  # [B,R,k,Di]
        # Each row has its own key set: score it as a batch of one-query problems.
        logits = self.indexer.scores(iq[bi, kl_rows][:, :, None], iw[bi, kl_rows][:, :, None], kg)[:, :, 0]
        logits = logits.masked_fill(s_rows < 0, float("-inf"))
        return _kl(p, logits)


def _kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    logq = logits.log_softmax(-1)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - logq), torch.zeros_like(p))
    return terms.sum(-1).mean()


class Expert(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(h, inter), linear(h, inter), linear(inter, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.n_routed_experts, cfg.hidden_size) * cfg.hidden_size ** -0.5)
        # Steers selection only; trained by the aux-loss-free balancing rule, not by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = F.linear(x.float(), self.gate.weight.float())
        weights, ids = route(logits, self.gate.e_score_correction_bias.float(), self.cfg)
        out = self.shared_experts(x)
        load = torch.bincount(ids.flatten(), minlength=self.cfg.n_routed_experts)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                out = out.index_add(0, tok, (expert(x[tok]) * weights[tok, slot, None]).to(out.dtype))
        return out.view(shape), load


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else Expert(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TrainModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self._rope: RotaryEmbedding | None = None

    def rope(self, t: int, device: torch.device) -> RotaryEmbedding:
        if self._rope is None or self._rope.cos.shape[0] < t or self._rope.cos.device != device:
            self._rope = RotaryEmbedding(self.cfg.rope, self.cfg.qk_rope_head_dim,
                                         max(t, self.cfg.max_position_embeddings), device, torch.float32)
        return self._rope

    def forward(self, ids: torch.Tensor, sparse: bool = False,
                kl_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, Aux]:
        """ids [B,T] -> (logits [B,T,V] fp32, Aux)."""
        rope = self.rope(ids.shape[1], ids.device)
        x = self.model.embed_tokens(ids)
        kls, loads = [], []
        for layer in self.model.layers:
            a, kl = layer.self_attn(layer.input_layernorm(x), rope, sparse, kl_rows)
            x = x + a
            h = layer.post_attention_layernorm(x)
            if isinstance(layer.mlp, MoE):
                m, load = layer.mlp(h)
                loads.append(load)
            else:
                m = layer.mlp(h)
            x = x + m
            kls.append(kl)
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, Aux(torch.stack(kls).mean(), loads)

    def main_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." not in n]

    def indexer_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".indexer." in n]

    @torch.no_grad()
    def balance_experts(self, loads: list[torch.Tensor], rate: float) -> None:
        """DeepSeek-V3's aux-loss-free balancing: nudge each expert's selection bias toward equal load."""
        moes = [l.mlp for l in self.model.layers if isinstance(l.mlp, MoE)]
        for moe, load in zip(moes, loads):
            load = load.float()
            moe.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)

    def checkpoint(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {n: t.detach().to(dtype).contiguous() for n, t in self.state_dict().items()}
