"""Host-side helpers shared by the attention kernels: tile configs, split heuristics, shape checks, and the
fp32 softmax-attention math the `*_ref` functions are built from.

Pure torch/Python (no triton import), so the references stay usable where triton is missing.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634
DEFAULT_SMS = 132  # H100/H200 SXM; used when no CUDA device is visible


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests): pick tiny tiles, fp32 dots."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:  # cached: the launchers call this on every decode step
    return torch.cuda.get_device_properties(index).multi_processor_count


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def check_latent_dims(kv_lora_rank: int, rope_dim: int) -> None:
    # tl.arange needs power-of-two extents; every DeepSeek MLA config (512/64) and the tiny test configs
    # (64/16) satisfy this, so we refuse the rest rather than pay for masked padding on every tile.
    if not (is_pow2(kv_lora_rank) and is_pow2(rope_dim)):
        raise ValueError(f"kv_lora_rank ({kv_lora_rank}) and rope_dim ({rope_dim}) must be powers of two")


def fp8_block(kv_lora_rank: int) -> int:
    """Values per fp32 scale in the fp8 latent row (matches LatentFormat.block)."""
    return min(128, kv_lora_rank)


def fp8_row_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    return kv_lora_rank + 4 * (kv_lora_rank // fp8_block(kv_lora_rank)) + 2 * rope_dim


def check_cache(cache: torch.Tensor, kv_lora_rank: int, rope_dim: int, fp8: bool) -> None:
    if cache.dim() != 2 or cache.stride(1) != 1:
        raise ValueError("cache must be 2-D rows with contiguous columns")
    if fp8:
        want = fp8_row_bytes(kv_lora_rank, rope_dim)
        if cache.dtype != torch.uint8 or cache.shape[1] != want:
            raise ValueError(f"fp8 cache must be uint8 rows of {want} bytes, got {cache.dtype} {tuple(cache.shape)}")
        if cache.stride(0) % 4 != 0:
            raise ValueError("fp8 rows must start 4-byte aligned (the fp32 scales are read in place)")
    elif cache.shape[1] != kv_lora_rank + rope_dim or cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"cache must be [R, {kv_lora_rank + rope_dim}] bf16/fp16/fp32, got {cache.dtype} {tuple(cache.shape)}")


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of the MLA attention kernels: BLOCK_H query heads (rows of the MMA) x BLOCK_N keys."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int


def default_tile(n_heads: int, fp8: bool, fp32: bool = False) -> TileConfig:
    if interpreting():
        # The interpreter runs every program serially in numpy: small tiles keep tests fast and still loop.
        return TileConfig(block_h=16, block_n=16, num_warps=4, num_stages=1)
    if fp32:
        # fp32 operands (an fp32 cache: exactness checks, not serving) take twice the shared memory of the
        # bf16 tiles below, which then exceed the 227 KB limit at kv_lora 512 (measured on H200: 304 KB
        # requested). 32 heads x 16 keys, one stage: q 72 KB + k 36 KB.
        return TileConfig(block_h=max(16, min(32, next_pow2(n_heads))), block_n=16, num_warps=4, num_stages=1)
    # 64 heads x 512 fp32 accumulator = 128 registers/thread at 8 warps (as in FlashMLA): one wgmma
    # M=64 tile per warpgroup pair; 128 heads would need 256 registers/thread and spill.
    # BLOCK_N 64 with 2 stages: cp.async double-buffered K tiles (2 x 72 KB) + q (72 KB) fit in 227 KB of
    # shared memory and ptxas reports no spills for bf16 (sm_90a AOT compile); 32 keys spill ~100 bytes.
    block_h = max(16, min(64, next_pow2(n_heads)))
    if fp8 and block_h == 32:
        # The fp8 dequantization registers make the 32-head tile (4 warps) spill 744 bytes per thread (sm_90a
        # compile); the 64-head tile at 8 warps spills 8, so 32 heads run it with half its rows masked.
        block_h = 64
    warps = 8 if block_h == 64 else 4
    return TileConfig(block_h=block_h, block_n=64 if block_h == 64 else 32, num_warps=warps, num_stages=2)


def choose_num_splits(batch: int, head_blocks: int, max_len: int, block_n: int, sms: int,
                      min_tokens_per_split: int = 256, max_splits: int = 64, good_fill: float = 0.9) -> int:
    """Fewest splits whose programs fill `sms` SMs well (one program per SM at our tile size) for sequences
    of up to `max_len` keys. Fill = programs / (waves * sms). Every extra split costs fp32 partial writes
    plus a merge pass ([splits, B, Hq, 512] floats: at batch 32 and 33 splits that is as many bytes as a
    32K-token bf16 cache), so the smallest split count reaching `good_fill` wins; if none does (short
    sequences at tiny batch), the best-filling one within the cap."""
    base = max(1, batch * head_blocks)
    cap = max(1, min(max_splits, max_len // max(min_tokens_per_split, block_n)))
    fills = {s: base * s / (math.ceil(base * s / sms) * sms) for s in range(1, cap + 1)}
    for s, fill in fills.items():
        if fill >= good_fill:
            return s
    return max(fills, key=lambda s: (fills[s], -s))


def empty_result(b: int, heads: int, v_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode kernels' result buffers: out fp32 [B, H, V] and lse fp32 [B, H]."""
    return (torch.empty(b, heads, v_dim, dtype=torch.float32, device=device),
            torch.empty(b, heads, dtype=torch.float32, device=device))


def split_partials(out: torch.Tensor, lse: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers for the split-KV partials, [splits, *out.shape] and [splits, *lse.shape], that `merge_lse`
    combines into out / lse. With one split the kernel writes the final tensors in place (no merge)."""
    if num_splits == 1:
        return out.unsqueeze(0), lse.unsqueeze(0)
    return out.new_empty(num_splits, *out.shape), lse.new_empty(num_splits, *lse.shape)


def attention_fp32(q: torch.Tensor, kv: torch.Tensor, v_dim: int, scale: float,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention in fp32 for the references. q [n, H, D], kv [m, D] (values = first v_dim
    columns), mask [n, m] (True = attend). Returns out [n, H, v_dim], natural-log lse [n, H]; rows that
    see no key get out 0 and lse -inf."""
    n, h, _ = q.shape
    qf, kvf = q.float(), kv.float()
    scores = torch.einsum("nhd,md->nhm", qf, kvf) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    if kv.shape[0] == 0:
        return qf.new_zeros(n, h, v_dim), qf.new_full((n, h), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(finite[..., None], p, torch.zeros_like(p))
    out = torch.einsum("nhm,mv->nhv", p, kvf[:, :v_dim])
    return out, torch.where(finite, lse, torch.full_like(lse, float("-inf")))


def fix_interpreter_scalars() -> None:
    """Make Triton's CPU interpreter accept tensor loop bounds (`range(start, end)`) under numpy >= 2.x.

    The interpreter (triton 3.6) holds scalars as 1-element numpy arrays and implements `__index__` as
    `int(array)`, which recent numpy rejects for ndim > 0, so every kernel with a runtime loop bound fails
    when interpreted. We wrap its tensor patcher to convert through `.item()`. Interpreter only; idempotent;
    a no-op where the interpreter module layout differs."""
    if not interpreting():
        return
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_dcpserve_fixed", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._dcpserve_fixed = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched
