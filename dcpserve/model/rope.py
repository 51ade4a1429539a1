"""Rotary position embedding with YaRN, computed exactly as the HuggingFace reference does (float32 angles,
cos/sin scaled by the YaRN attention factor), so that positions encode identically."""
from __future__ import annotations

import math

import torch

from dcpserve.config import RopeConfig, yarn_get_mscale


def inv_freq_and_scale(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.rope_type != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    if rope.attention_factor is not None:
        attn = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attn = float(yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(factor, rope.mscale_all_dim))
    else:
        attn = yarn_get_mscale(factor)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attn


def rope_ref(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, (H,) R] rotated by the tables' rows at `positions` (interleaved pairs or rotate-half); written
    into `out` when given. The reference of kernels/rope.py, which rounds every product and sum the same way."""
    cos, sin = cos[positions], sin[positions]
    while cos.dim() < x.dim():  # broadcast over head dims between token and feature
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
    y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if out is not None:
        out.copy_(y)
        return out
    return y


class RotaryEmbedding:
    def __init__(self, rope: RopeConfig, dim: int, max_positions: int, device: torch.device, dtype: torch.dtype):
        inv_freq, scale = inv_freq_and_scale(rope, dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = t[:, None] * inv_freq[None, :]
        self.cos = (freqs.cos() * scale).to(device=device, dtype=dtype)  # [P, dim/2]
        self.sin = (freqs.sin() * scale).to(device=device, dtype=dtype)
        self.fused = False  # set by the runner with the Triton backend: one kernel per call (kernels/rope.py)

    def apply_interleaved(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """MLA rope: pairs (x0, x1), (x2, x3), ... rotate together. The result is laid out de-interleaved
        (rotated evens, then rotated odds), as HF does; q and k share the layout, so dot products are equal.
        x [T, R] or [T, H, R]; `out` (optional, may be x): where to write it."""
        return self._apply(x, positions, True, out)

    def apply_half(self, x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Non-interleaved (rotate-half) rope, used by the DSA indexer (and MLA when rope_interleave=False)."""
        return self._apply(x, positions, False, out)

    def _apply(self, x: torch.Tensor, positions: torch.Tensor, interleaved: bool, out: torch.Tensor | None) -> torch.Tensor:
        if self.fused:
            from dcpserve.kernels.rope import rope

            return rope(x, positions, self.cos, self.sin, interleaved, out)
        return rope_ref(x, positions, self.cos, self.sin, interleaved, out)
