"""Byte formats of the KV caches and their torch reference (de)quantizers.

Latent row (MLA), per token and layer:
  * full precision: `kv_lora_rank + rope` values in the cache dtype (576 x 2 B = 1152 B in bf16);
  * fp8 ("656 B"): `kv_lora_rank` e4m3 values, one fp32 scale per 128 of them, then `rope` bf16 values
    (512 + 4*4 + 64*2 = 656 B). The rope part stays bf16 because it carries position information that e4m3
    resolves too coarsely.
Indexer key row (DSA), per token and layer:
  * full precision: `index_head_dim` values in the cache dtype;
  * fp8 ("132 B"): `index_head_dim` e4m3 values and one fp32 scale (128 + 4 = 132 B).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
QBLOCK = 128


def _fp8_max(device: torch.device) -> torch.Tensor:
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal, which
    # rounds differently from the CPU and from the Triton write kernels (a true division). torch.full, not
    # torch.tensor: a fill kernel, where torch.tensor's pageable host-to-device copy waits for the stream to
    # drain (a host sync in every prefill layer).
    return torch.full((), FP8_MAX, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class LatentFormat:
    kv_lora_rank: int
    rope_dim: int
    fp8: bool
    dtype: torch.dtype  # storage dtype when not fp8 (and compute dtype of dequantized rows)

    @property
    def block(self) -> int:
        return min(QBLOCK, self.kv_lora_rank)

    @property
    def n_scales(self) -> int:
        return -(-self.kv_lora_rank // self.block)

    @property
    def row_bytes(self) -> int:
        if self.fp8:
            return self.kv_lora_rank + 4 * self.n_scales + 2 * self.rope_dim
        return (self.kv_lora_rank + self.rope_dim) * self.dtype.itemsize

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.fp8:
            return torch.zeros(rows, self.row_bytes, dtype=torch.uint8, device=device)
        return torch.zeros(rows, self.kv_lora_rank + self.rope_dim, dtype=self.dtype, device=device)

    def encode(self, kv: torch.Tensor) -> torch.Tensor:
        """[n, kv_lora + rope] -> storage rows."""
        if not self.fp8:
            return kv.to(self.dtype)
        n, r = kv.shape[0], self.kv_lora_rank
        nope = kv[:, :r].float()
        pad = self.n_scales * self.block - r
        blocks = torch.nn.functional.pad(nope, (0, pad)).view(n, self.n_scales, self.block)
        scale = (blocks.abs().amax(-1).clamp_min(1e-8) / _fp8_max(kv.device)).to(torch.float32)
        q = (blocks / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(n, -1)[:, :r]
        out = torch.empty(n, self.row_bytes, dtype=torch.uint8, device=kv.device)
        out[:, :r] = q.view(torch.uint8)
        out[:, r : r + 4 * self.n_scales] = scale.view(torch.uint8).view(n, -1)
        out[:, r + 4 * self.n_scales :] = kv[:, r:].to(torch.bfloat16).contiguous().view(torch.uint8).view(n, -1)
        return out

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """storage rows -> [n, kv_lora + rope] in `self.dtype`."""
        if not self.fp8:
            return rows.to(self.dtype)
        r = self.kv_lora_rank
        q = rows[:, :r].contiguous().view(FP8).float()
        scale = rows[:, r : r + 4 * self.n_scales].contiguous().view(torch.float32)
        nope = q * scale.repeat_interleave(self.block, dim=1)[:, :r]
        rope = rows[:, r + 4 * self.n_scales :].contiguous().view(torch.bfloat16).float()
        return torch.cat([nope, rope], dim=1).to(self.dtype)


@dataclass(frozen=True)
class IndexKeyFormat:
    head_dim: int
    fp8: bool
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return self.head_dim + 4 if self.fp8 else self.head_dim * self.dtype.itemsize

    def empty(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.fp8:
            return torch.zeros(rows, self.row_bytes, dtype=torch.uint8, device=device)
        return torch.zeros(rows, self.head_dim, dtype=self.dtype, device=device)

    def encode(self, k: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return k.to(self.dtype)
        n, dh = k.shape
        kf = k.float()
        scale = (kf.abs().amax(-1, keepdim=True).clamp_min(1e-8) / _fp8_max(k.device)).to(torch.float32)
        out = torch.empty(n, self.row_bytes, dtype=torch.uint8, device=k.device)
        out[:, :dh] = (kf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)
        out[:, dh:] = scale.view(torch.uint8).view(n, 4)
        return out

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return rows.to(self.dtype)
        dh = self.head_dim
        q = rows[:, :dh].contiguous().view(FP8).float()
        scale = rows[:, dh:].contiguous().view(torch.float32)
        return (q * scale).to(self.dtype)
