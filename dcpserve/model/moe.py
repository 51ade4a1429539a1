"""DeepSeek MoE: sigmoid scores, grouped top-k routing where `e_score_correction_bias` steers selection only,
normalized top-k weights times `routed_scaling_factor`, shared experts. Experts are tensor-parallel (each
rank holds a slice of every expert's intermediate dim); routed and shared outputs are summed before the
single all-reduce."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcpserve.config import ModelConfig
from dcpserve.distributed.comm import tp_all_reduce
from dcpserve.distributed.parallel import ParallelState
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

            out = fused_moe(x, self.w13, self.w2, weights, ids)
        else:
            out = self.experts(x, weights, ids)
        if self.shared is not None:
            out = out + self.shared(x)
        return tp_all_reduce(self.ps, out)

    def experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.where(ids == e)
            gate_up = F.linear(x[tok], self.w13[e])
            h = F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :]
            y = F.linear(h, self.w2[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def load(self, r: Reader, prefix: str) -> None:
        cfg, h = self.cfg, self.cfg.hidden_size
        e, inter_full = cfg.n_routed_experts, cfg.moe_intermediate_size
        self.gate_weight.data = r.get(f"{prefix}.gate.weight", (e, h), dtype=torch.float32)
        if cfg.model_type in ("deepseek_v3", "deepseek_v32"):
            self.bias.data = r.get(f"{prefix}.gate.e_score_correction_bias", (e,), dtype=torch.float32)
        col = ShardSpec(0, self.ps.tp_rank, self.ps.tp_size)
        row = ShardSpec(1, self.ps.tp_rank, self.ps.tp_size)
        w13 = torch.empty_like(self.w13.data, dtype=r.dtype, device=r.device)
        w2 = torch.empty_like(self.w2.data, dtype=r.dtype, device=r.device)
        for i in range(e):
            p = f"{prefix}.experts.{i}"
            w13[i, : self.inter] = r.get(f"{p}.gate_proj.weight", (inter_full, h), col)
            w13[i, self.inter :] = r.get(f"{p}.up_proj.weight", (inter_full, h), col)
            w2[i] = r.get(f"{p}.down_proj.weight", (h, inter_full), row)
        self.w13.data, self.w2.data = w13, w2
        if self.shared is not None:
            self.shared.load(r, f"{prefix}.shared_experts")
