"""Tiny DeepSeek-V3 / V3.2 checkpoints built with HuggingFace transformers, and transformers' own greedy
outputs on them: the independent reference the engine must match."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dcpserve.bench.hf_compare import hf_model_with_values
from dcpserve.loader.fp8 import to_fp8_checkpoint as write_fp8_checkpoint

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=16,
              routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16,
              qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1,
              max_position_embeddings=4096, rope_parameters=YARN, bos_token_id=0, eos_token_id=1)

# Prompts of different lengths; the V3.2 model's index_topk (16) is below all but the shortest context, so
# the indexer's selection matters.
PROMPTS = [[(i * 37 + 11) % 250 + 2 for i in range(40)], [(i * 53 + 7) % 250 + 2 for i in range(23)], [5, 17, 42]]
NEW_TOKENS = 32

# fp32 everywhere (the reference runs in fp32); DCPSERVE_TEST_BACKEND=triton runs the same tests on the Triton
# kernels (on a GPU, or through the interpreter with TRITON_INTERPRET=1).
ENGINE_DEFAULTS = {"dtype": "float32", "attention_backend": os.environ.get("DCPSERVE_TEST_BACKEND", "torch")}


@dataclass
class Reference:
    path: str
    outputs: list[list[int]]  # transformers' greedy tokens per prompt
    logits: list[torch.Tensor]  # [NEW_TOKENS, vocab] per prompt
    min_margin: float  # smallest top1-top2 logit gap seen: the test is meaningful only if this is not tiny


def build_model(kind: str, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM

    torch.manual_seed(seed)
    if kind == "v32":
        model = DeepseekV32ForCausalLM(DeepseekV32Config(**COMMON, index_topk=16, index_head_dim=32, index_n_heads=16))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**COMMON))
    with torch.no_grad():
        # Larger-than-default weights: sharp logits, far from ties.
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0, 1)
            elif p.dim() >= 2:
                p.normal_(0, 2.0 * p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


def to_fp8_checkpoint(model, path: str, block: tuple[int, int] = (128, 128)):
    """Rewrite a saved checkpoint with fp8 block-quantized linear weights, and return `model` with the dequantized
    weights: the exact reference of the fp8 checkpoint."""
    sd = write_fp8_checkpoint(path, block)
    return hf_model_with_values(model, sd, path + "-dequant-ref", torch.float32, "cpu")


def hf_greedy(model, prompts=PROMPTS, new_tokens: int = NEW_TOKENS) -> tuple[list[list[int]], list[torch.Tensor], float]:
    outs, logits, margin = [], [], float("inf")
    # Like the engine's ignore_eos: keep going past EOS without suppressing it (min_new_tokens would mask
    # the EOS logit and change greedy choices).
    model.generation_config.eos_token_id = None
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        outs.append(g.sequences[0, len(p):].tolist())
        lg = torch.stack([x[0].float() for x in g.logits])
        top2 = lg.topk(2, dim=-1).values
        margin = min(margin, float((top2[:, 0] - top2[:, 1]).min()))
        logits.append(lg)
    return outs, logits, margin


def make_reference(kind: str, root: str) -> Reference:
    """kind: 'v32', 'v3', 'v32-fp8' (128x128 blocks: one block per tiny matrix) or 'v32-fp8b16' (16x16 blocks, so
    that tp=2 shards cover whole blocks and stay fp8)."""
    base = kind.split("-")[0]
    model = build_model(base)
    path = os.path.join(root, kind)
    model.save_pretrained(path)
    if "fp8" in kind:
        model = to_fp8_checkpoint(model, path, (16, 16) if kind.endswith("b16") else (128, 128))
    with torch.no_grad():
        outs, logits, margin = hf_greedy(model)
    return Reference(path, outs, logits, margin)
