"""DeepSeek-V3 / V3.2: one class; the DSA indexer is on when the config has `index_topk`."""
from __future__ import annotations

import torch
from torch import nn

from dcpserve.config import ModelConfig
from dcpserve.distributed.parallel import ParallelState
from dcpserve.engine.forward_batch import ForwardBatch
from dcpserve.loader.reader import Reader
from dcpserve.model.layers import DenseMLP, ParallelLMHead, RMSNorm, VocabParallelEmbedding
from dcpserve.model.mla import MLA, AttnRuntime
from dcpserve.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, ps: ParallelState):
        super().__init__()
        self.self_attn = MLA(cfg, layer, ps)
        self.mlp = MoE(cfg, ps) if cfg.is_moe_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size, ps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, fb: ForwardBatch, rt: AttnRuntime) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), fb, rt)
        return x + self.mlp(self.post_attention_layernorm(x))

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
        x = self.embed_tokens(fb.input_ids)
        for layer in self.layers:
            x = layer(x, fb, rt)
        x = self.norm(x[fb.last_idx])
        return self.lm_head(x).float()

    def load(self, r: Reader) -> None:
        # Layers past num_hidden_layers (the MTP layer of official checkpoints) are not read.
        self.embed_tokens.load(r, "model.embed_tokens")
        for i, layer in enumerate(self.layers):
            layer.load(r, f"model.layers.{i}")
        self.norm.load(r, "model.norm")
        self.lm_head.load(r, "lm_head")
