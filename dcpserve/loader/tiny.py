"""Small checkpoints made by the project: where the embedded default model lives (so the README's main command
runs offline), random-weight tiny models for tests, and the tensor-name/shape map of a DeepSeek checkpoint,
shared by the writer and the tests."""
from __future__ import annotations

import json
import os

import torch

from dcpserve.config import ModelConfig

# A small DeepSeek-V3.2-shaped model: MLA, a lightning indexer that must select (topk < context), MoE with
# grouped routing, YaRN.
TINY_V32_CONFIG: dict = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
                        "mscale": 1.0, "mscale_all_dim": 1.0},
    "index_n_heads": 8,
    "index_head_dim": 32,
    "index_topk": 32,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": "float32",
    "tie_word_embeddings": False,
}


# The real DeepSeek-V3.2 architecture (config.json of the official checkpoint), for `--load-format dummy`
# benchmarks and capacity planning: `--model-path builtin:deepseek-v3.2`.
DEEPSEEK_V32_CONFIG: dict = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "first_k_dense_replace": 3, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
}
BUILTIN_CONFIGS = {"deepseek-v3.2": DEEPSEEK_V32_CONFIG, "tiny-v3.2": TINY_V32_CONFIG}


def cache_root() -> str:
    return os.environ.get("DCPSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dcpserve"))


def resolve_builtin(model_path: str) -> str:
    """`builtin:NAME` -> a directory holding that architecture's config.json (for dummy weights)."""
    name = model_path.split(":", 1)[1]
    if name not in BUILTIN_CONFIGS:
        from dcpserve.config import ConfigError

        raise ConfigError(f"unknown builtin model {name!r}: choose from {', '.join(BUILTIN_CONFIGS)}")
    path = os.path.join(cache_root(), "builtin-" + name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(BUILTIN_CONFIGS[name], f, indent=2)
    return path


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF-format DeepSeek-V3/V3.2 checkpoint holds, with its shape."""
    h, s = cfg.hidden_size, {}
    s["model.embed_tokens.weight"] = (cfg.vocab_size, h)
    s["lm_head.weight"] = (cfg.vocab_size, h)
    s["model.norm.weight"] = (h,)
    nh = cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        s[f"{p}.input_layernorm.weight"] = (h,)
        s[f"{p}.post_attention_layernorm.weight"] = (h,)
        a = f"{p}.self_attn"
        if cfg.q_lora_rank:
            s[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, h)
            s[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            s[f"{a}.q_b_proj.weight"] = (nh * cfg.qk_head_dim, cfg.q_lora_rank)
        else:
            s[f"{a}.q_proj.weight"] = (nh * cfg.qk_head_dim, h)
        s[f"{a}.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        s[f"{a}.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        s[f"{a}.kv_b_proj.weight"] = (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        s[f"{a}.o_proj.weight"] = (h, nh * cfg.v_head_dim)
        if cfg.has_indexer:
            x = f"{a}.indexer"
            s[f"{x}.wq_b.weight"] = (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
            s[f"{x}.wk.weight"] = (cfg.index_head_dim, h)
            s[f"{x}.k_norm.weight"] = (cfg.index_head_dim,)
            s[f"{x}.k_norm.bias"] = (cfg.index_head_dim,)
            s[f"{x}.weights_proj.weight"] = (cfg.index_n_heads, h)
        m = f"{p}.mlp"
        if cfg.is_moe_layer(i):
            s[f"{m}.gate.weight"] = (cfg.n_routed_experts, h)
            s[f"{m}.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
            for e in range(cfg.n_routed_experts):
                s[f"{m}.experts.{e}.gate_proj.weight"] = (cfg.moe_intermediate_size, h)
                s[f"{m}.experts.{e}.up_proj.weight"] = (cfg.moe_intermediate_size, h)
                s[f"{m}.experts.{e}.down_proj.weight"] = (h, cfg.moe_intermediate_size)
            si = cfg.moe_intermediate_size * cfg.n_shared_experts
            if si:
                s[f"{m}.shared_experts.gate_proj.weight"] = (si, h)
                s[f"{m}.shared_experts.up_proj.weight"] = (si, h)
                s[f"{m}.shared_experts.down_proj.weight"] = (h, si)
        else:
            s[f"{m}.gate_proj.weight"] = (cfg.intermediate_size, h)
            s[f"{m}.up_proj.weight"] = (cfg.intermediate_size, h)
            s[f"{m}.down_proj.weight"] = (h, cfg.intermediate_size)
    return s


def random_weights(cfg: ModelConfig, seed: int, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights whose logits are far from ties: `gain` sharpens every matrix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * gain * shape[-1] ** -0.5
        out[name] = t.contiguous()
    return out


def write_checkpoint(path: str, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return path


def byte_tokenizer_json(vocab_size: int, specials: list[str]) -> str:
    """A byte-level tokenizer (one token per byte, then special tokens) built without training or downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i + len(specials) for i, ch in enumerate(sorted(alphabet))}
    for i, sp in enumerate(specials):
        vocab[sp] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() <= vocab_size
    return tok.to_str()


TINY_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "demo-v32")


def default_model_path() -> str:
    """The embedded default: the demo model trained by `dcpserve.train` on the long-context retrieval task,
    shipped in the package (no download)."""
    if not os.path.isfile(os.path.join(DEMO_MODEL_DIR, "model.safetensors")):
        from dcpserve.config import ConfigError

        raise ConfigError(f"the embedded demo model is missing from {DEMO_MODEL_DIR}: reinstall dcpserve")
    return DEMO_MODEL_DIR
