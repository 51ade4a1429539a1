"""DeepSeek MoE: sigmoid scores, grouped top-k routing where `e_score_correction_bias` steers selection only,
normalized top-k weights times `routed_scaling_factor`, shared experts. Experts are tensor-parallel (each
rank holds a slice of every expert's intermediate dim); routed and shared outputs are summed before the
single all-reduce. Expert weights stay DeepSeek block-fp8 (e4m3 + scales) when the reader keeps fp8."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcpserve.config import ConfigError, ModelConfig
from dcpserve.distributed.comm import tp_all_reduce
from dcpserve.distributed.parallel import ParallelState
from dcpserve.loader.fp8 import Fp8Weight, dequantize_block
from dcpserve.loader.reader import Reader, ShardSpec
from dcpserve.model.layers import DenseMLP


def route(logits: torch.Tensor, bias: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (weights [T, k] fp32, expert ids [T, k])."""
    scores = logits.sigmoid()
    choice = scores + bias
    t, e = choice.shape
    groups = choice.view(t, cfg.n_group, e // cfg.n_group)
    group_scores = groups.topk(min(2, e // cfg.n_group), dim=-1)[0].sum(-1)
    group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    score_mask = group_mask.unsqueeze(-1).expand(t, cfg.n_group, e // cfg.n_group).reshape(t, e)
    choice = choice.masked_fill(score_mask == 0, float("-inf"))
    ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


def expert_weights(w13: torch.Tensor, w2: torch.Tensor, scales, e: int,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's [2I, Hd] and [Hd, I] weights in `dtype`; fp8 experts (`scales`: kernels.moe.MoEScales) are
    dequantized per call, gate and up each with their own blocks."""
    if scales is None:
        return w13[e], w2[e]
    inter = w13.shape[1] // 2
    blk, nb = scales.block, -(-inter // scales.block[0])
    s13 = scales.w13[e]
    gate_up = torch.cat([dequantize_block(w13[e, :inter], s13[:nb], blk, dtype),
                         dequantize_block(w13[e, inter:], s13[nb:], blk, dtype)])
    return gate_up, dequantize_block(w2[e], scales.w2[e], blk, dtype)


def experts_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 scales=None) -> torch.Tensor:
    """The routed experts one at a time in plain torch (the torch backend's path, and what kernels/moe.py
    computes): out[t] = sum_j weights[t, j] * w2[e] @ (silu(g) * u), [g; u] = w13[e] @ x[t], e = ids[t, j]."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        gu_w, down_w = expert_weights(w13, w2, scales, e, x.dtype)
        gate_up = F.linear(x[tok], gu_w)
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(h, down_w) * weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        self.cfg, self.ps = cfg, ps
        e, h = cfg.n_routed_experts, cfg.hidden_size
        self.inter = cfg.moe_intermediate_size // ps.tp_size
        self.gate_weight = nn.Parameter(torch.empty(e, h), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(e), requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * self.inter, h), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, self.inter), requires_grad=False)
        self.scales = None  # kernels.moe.MoEScales when w13/w2 are e4m3
        self.fused = False  # set by the runner when the Triton backend is on: one grouped GEMM, graph-safe
        self.shared = (
            DenseMLP(h, cfg.moe_intermediate_size * cfg.n_shared_experts, ps, reduce=False)
            if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.gate_weight.float())
        weights, ids = route(logits, self.bias.float(), self.cfg)
        if self.fused:
            from dcpserve.kernels.moe import fused_moe

            out = fused_moe(x, self.w13, self.w2, weights, ids, scales=self.scales)
        else:
            out = self.experts(x, weights, ids)
        if self.shared is not None:
            out = out + self.shared(x)
        return tp_all_reduce(self.ps, out)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return experts_loop(x, self.w13, self.w2, weights, ids, self.scales)

    def _allocate(self, gate: Fp8Weight | None, down: Fp8Weight | None, r: Reader) -> None:
        e = self.cfg.n_routed_experts
        dtype = gate.q.dtype if gate is not None else r.dtype
        self.w13.data = torch.empty(self.w13.shape, dtype=dtype, device=r.device)
        self.w2.data = torch.empty(self.w2.shape, dtype=dtype, device=r.device)
        self.scales = None
        if gate is not None and down is not None:
            from dcpserve.kernels.moe import MoEScales

            s13, s2 = gate.scale.shape, down.scale.shape
            self.scales = MoEScales(torch.empty(e, 2 * s13[0], s13[1], device=r.device),
                                    torch.empty(e, *s2, device=r.device), gate.block)

    def load(self, r: Reader, prefix: str) -> None:
        cfg, h = self.cfg, self.cfg.hidden_size
        e, inter_full = cfg.n_routed_experts, cfg.moe_intermediate_size
        self.gate_weight.data = r.get(f"{prefix}.gate.weight", (e, h), dtype=torch.float32)
        if cfg.model_type in ("deepseek_v3", "deepseek_v32"):
            self.bias.data = r.get(f"{prefix}.gate.e_score_correction_bias", (e,), dtype=torch.float32)
        col = ShardSpec(0, self.ps.tp_rank, self.ps.tp_size)
        row = ShardSpec(1, self.ps.tp_rank, self.ps.tp_size)
        specs = (("gate", (inter_full, h), col), ("up", (inter_full, h), col), ("down", (h, inter_full), row))
        fp8 = None
        for i in range(e):
            g, u, d = (r.get_linear(f"{prefix}.experts.{i}.{n}_proj.weight", shape, shard) for n, shape, shard in specs)
            if fp8 is None:  # expert 0 decides the layer's storage; filled one expert at a time (peak memory)
                fp8 = all(isinstance(w, Fp8Weight) for w in (g, u, d))
                self._allocate(g if fp8 else None, d if fp8 else None, r)
            if fp8:
                if not all(isinstance(w, Fp8Weight) for w in (g, u, d)):
                    raise ConfigError(f"{prefix}.experts.{i} is not fp8 like expert 0: mixed expert formats")
                self.w13.data[i] = torch.cat([g.q, u.q])
                self.w2.data[i] = d.q
                self.scales.w13[i] = torch.cat([g.scale, u.scale])
                self.scales.w2[i] = d.scale
            else:  # e.g. a shard that splits a scale block: the model dtype
                g, u, d = (w if isinstance(w, torch.Tensor) else dequantize_block(w.q, w.scale, w.block, r.dtype)
                           for w in (g, u, d))
                self.w13.data[i] = torch.cat([g, u])
                self.w2.data[i] = d
        if self.shared is not None:
            self.shared.load(r, f"{prefix}.shared_experts")
