"""DeepSeek-V3 / V3.2: one class; the DSA indexer is on when the config has `index_topk`."""
from __future__ import annotations

import torch
from torch import nn

from dcpserve.config import ModelConfig
from dcpserve.distributed.parallel import ParallelState
from dcpserve.engine.forward_batch import ForwardBatch
from dcpserve.loader.reader import Reader
from dcpserve.model.layers import (
    DenseMLP,
    Linear,
    ParallelLMHead,
    RMSNorm,
    VocabParallelEmbedding,
)
from dcpserve.model.mla import MLA, AttnRuntime
from dcpserve.model.moe import MoE
from dcpserve.model.rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState):
        super().__init__()
        self.self_attn = MLA(cfg, layer, ps)
        self.mlp = MoE(cfg, ps) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size, ps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, fb: ForwardBatch,
                rt: AttnRuntime) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is h + residual (residual None: h alone, the first layer). Each sum is formed
        inside the next norm (one kernel with the Triton backend), not by a separate add."""
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(h, fb, rt), residual)
        return self.mlp(h), residual

    def load(self, r: Reader, prefix: str) -> None:
        self.self_attn.load(r, prefix + ".self_attn")
        self.mlp.load(r, prefix + ".mlp")
        self.input_layernorm.load(r, prefix + ".input_layernorm")
        self.post_attention_layernorm.load(r, prefix + ".post_attention_layernorm")


class DeepseekForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ps: ParallelState):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, ps)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, ps) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, ps)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, rt: AttnRuntime) -> torch.Tensor:
        """Returns full-vocab logits (fp32) of each sequence's last token, on every rank."""
        h, residual = self.embed_tokens(fb.input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, fb, rt)
        last = h[fb.last_idx]
        x = self.norm(last) if residual is None else self.norm.add_forward(last, residual[fb.last_idx])[0]
        return self.lm_head(x).float()

    def use_triton_kernels(self, rope: RotaryEmbedding) -> None:
        """The Triton backend's fused kernels for the layers' norms, rope, MoE and fp8 linears (graph-safe, fewer
        launches)."""
        rope.fused = True
        for m in self.modules():
            if isinstance(m, (RMSNorm, MoE, Linear)):
                m.fused = True

    def load(self, r: Reader) -> None:
        # Layers past num_hidden_layers (the MTP layer of official checkpoints) are not read.
        self.embed_tokens.load(r, "model.embed_tokens")
        for i, layer in enumerate(self.layers):
            layer.load(r, f"model.layers.{i}")
        self.norm.load(r, "model.norm")
        self.lm_head.load(r, "lm_head")
