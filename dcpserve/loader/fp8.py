"""DeepSeek's fp8 weight format and the torch reference of it.

A linear weight W [out, in] is stored as e4m3 values q and one fp32 `weight_scale_inv` per block of
bo x bi = 128 x 128 elements (ragged at the right and bottom edges): W = q * scale[row // bo, col // bi].
The official DeepSeek-V3/R1/V3.2 checkpoints ship every layer matrix this way (embeddings, lm_head, the
router and the indexer's weights_proj stay bf16). Keeping the weights in fp8 halves their memory, which is
what lets the 671B model fit on one 8-GPU H200/H100 server at all, and halves the bytes a batch-1 decode
step streams.

A rank keeps a tensor-parallel shard in fp8 only when the shard covers whole blocks (then its scales are a
plain slice of the full scale grid, and local block = local index // block, so every TP size sees the same
values); every real DeepSeek shape is aligned at tp <= 8. Shards that split a block (tiny test models) are
dequantized at load instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcpserve.kv.formats import FP8, FP8_MAX


@dataclass
class Fp8Weight:
    q: torch.Tensor       # e4m3 [out, in]
    scale: torch.Tensor   # fp32 [ceil(out / bo), ceil(in / bi)]
    block: tuple[int, int]


def quantize_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> Fp8Weight:
    """Block-absmax e4m3 quantization (what DeepSeek's own conversion does): scale = amax / 448."""
    bo, bi = block
    o, i = w.shape
    no, ni = -(-o // bo), -(-i // bi)
    padded = F.pad(w.float(), (0, ni * bi - i, 0, no * bo - o))
    blocks = padded.view(no, bo, ni, bi)
    # A tensor divisor: on CUDA a Python-scalar division becomes a reciprocal multiply, which would round
    # differently on CPU and GPU.
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-8) / torch.full((), FP8_MAX, device=w.device)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(no * bo, ni * bi)[:o, :i]
    return Fp8Weight(q.contiguous(), scale.float(), tuple(block))


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int],
                 offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The per-element scales [out, in] of the `shape` elements starting at `offset` of the matrix that the
    block scale grid `scale` covers."""
    rows = torch.arange(offset[0], offset[0] + shape[0], device=scale.device) // block[0]
    cols = torch.arange(offset[1], offset[1] + shape[1], device=scale.device) // block[1]
    return scale[rows][:, cols]


def dequantize_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                     dtype: torch.dtype = torch.float32, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """q * scale in fp32, then rounded once to `dtype`. q may be a slice of the full matrix starting at
    `offset` (scale is then the full matrix's grid): a shard that splits a block."""
    return (q.float() * expand_scale(scale.float(), tuple(q.shape), block, offset)).to(dtype)


def aligned(dim_size: int, block: int, lo: int, hi: int) -> bool:
    """Whether the shard [lo, hi) of a dimension covers whole blocks only (or ends at the tensor's end)."""
    return lo % block == 0 and (hi % block == 0 or hi == dim_size)


def shard_scale(scale: torch.Tensor, block: tuple[int, int], dim: int, lo: int, hi: int) -> torch.Tensor:
    """The scales of rows (dim 0) or columns (dim 1) [lo, hi), lo on a block boundary."""
    b = block[dim]
    return scale.narrow(dim, lo // b, -(-hi // b) - lo // b).contiguous()


def shard_fp8(w: Fp8Weight, dim: int | None, lo: int, hi: int) -> Fp8Weight | None:
    """Rows (dim 0) or columns (dim 1) [lo, hi) of a full fp8 weight with their scales; None when the shard
    splits a block."""
    if dim is None:
        return w
    if not aligned(w.q.shape[dim], w.block[dim], lo, hi):
        return None
    return Fp8Weight(w.q.narrow(dim, lo, hi - lo).contiguous(), shard_scale(w.scale, w.block, dim, lo, hi), w.block)


def is_quantized_in_checkpoints(name: str, t: torch.Tensor) -> bool:
    """The tensors DeepSeek's fp8 checkpoints store in e4m3: the layer matrices, not the embeddings, lm_head,
    MoE router or the indexer's weights_proj."""
    return (t.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and "lm_head" not in name
            and not name.endswith("mlp.gate.weight") and "weights_proj" not in name)


def to_fp8_checkpoint(path: str, block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """Rewrite the single-file checkpoint at `path` in DeepSeek's fp8 format (layer matrices e4m3 plus
    `_scale_inv`, `quantization_config` in config.json). Returns the state dict with those matrices replaced
    by their dequantized fp32 values: exactly the model the fp8 checkpoint describes, for a reference."""
    import json
    import os

    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(path, "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if is_quantized_in_checkpoints(name, t):
            w = quantize_block(t, block)
            out[name], out[name + "_scale_inv"] = w.q, w.scale
            sd[name] = dequantize_block(w.q, w.scale, block)
        else:
            out[name] = t
    save_file(out, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sd
