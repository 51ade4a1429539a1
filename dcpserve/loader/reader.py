"""Checkpoint readers: each rank reads only its own shard of each tensor.

`SafetensorsReader` reads a single file or a sharded checkpoint (`model.safetensors.index.json`),
bf16/fp16/fp32 tensors, and fp8 e4m3 tensors with block scales (`<name>_scale_inv`, fp32,
ceil(out/B) x ceil(in/B); format in `loader/fp8.py`). `DummyReader` gives deterministic random weights of
the requested shapes: the full tensor is drawn from a seed derived from its name and then sliced, so every
TP/DCP layout of the same seed sees the same model.

`get` always returns a tensor in the model dtype (fp8 is dequantized). `get_linear`, for the layer matrices,
returns an `Fp8Weight` instead when the reader keeps fp8: with `keep_fp8`, fp8 checkpoint tensors stay fp8;
with `quantize`, full-precision ones (and dummy weights) are block-quantized at load, each from the full
tensor's blocks so that every TP size sees the same values.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Protocol

import torch

from dcpserve.config import ConfigError
from dcpserve.kv.formats import FP8
from dcpserve.loader.fp8 import Fp8Weight, aligned, dequantize_block, quantize_block, shard_fp8, shard_scale


class ShardSpec:
    """Which slice of a full tensor a rank needs: `parts` equal pieces along `dim`, piece `index`."""

    def __init__(self, dim: int | None = None, index: int = 0, parts: int = 1):
        self.dim, self.index, self.parts = dim, index, parts

    def bounds(self, size: int) -> tuple[int, int]:
        step = size // self.parts
        return self.index * step, (self.index + 1) * step


FULL = ShardSpec()


class Reader(Protocol):
    dtype: torch.dtype
    device: torch.device

    def get(self, name: str, shape: tuple[int, ...], shard: ShardSpec = FULL,
            dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def get_linear(self, name: str, shape: tuple[int, int], shard: ShardSpec = FULL) -> torch.Tensor | Fp8Weight: ...


def _shard_fp8_or_dequant(w: Fp8Weight, shard: ShardSpec, dtype: torch.dtype) -> torch.Tensor | Fp8Weight:
    """This rank's shard of a full fp8 weight: fp8 when it covers whole blocks, else dequantized (same values)."""
    if shard.dim is None:
        return w
    lo, hi = shard.bounds(w.q.shape[shard.dim])
    part = shard_fp8(w, shard.dim, lo, hi)
    if part is not None:
        return part
    offset = (lo, 0) if shard.dim == 0 else (0, lo)
    return dequantize_block(w.q.narrow(shard.dim, lo, hi - lo), w.scale, w.block, dtype, offset)


class SafetensorsReader:
    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, block: tuple[int, int] | None,
                 keep_fp8: bool = False, quantize: bool = False):
        from safetensors import safe_open

        self.dtype, self.device = dtype, device
        self.block = tuple(block) if block else (128, 128)
        self.keep_fp8, self.quantize = keep_fp8, quantize
        index_path = os.path.join(model_path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        else:
            files = sorted(p for p in os.listdir(model_path) if p.endswith(".safetensors"))
            if not files:
                raise ConfigError(f"no *.safetensors files in {model_path!r}")
            weight_map = {}
            for fn in files:
                with safe_open(os.path.join(model_path, fn), "pt") as f:
                    weight_map.update({k: fn for k in f.keys()})
        self.weight_map = weight_map
        self._handles = {}
        self._open = lambda fn: safe_open(os.path.join(model_path, fn), "pt", device="cpu")
        self.model_path = model_path

    def _handle(self, name: str):
        fn = self.weight_map.get(name)
        if fn is None:
            raise ConfigError(f"checkpoint {self.model_path!r} lacks tensor {name!r}: is it a DeepSeek-V3/V3.2 checkpoint?")
        if fn not in self._handles:
            try:
                self._handles[fn] = self._open(fn)
            except FileNotFoundError:
                raise ConfigError(f"checkpoint shard {fn!r} listed in the index is missing") from None
        return self._handles[fn]

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _read(self, name: str, shape: tuple[int, ...], shard: ShardSpec) -> tuple[torch.Tensor, tuple[int, ...], int, int]:
        """(this rank's slice as stored, the full shape, lo, hi along the shard dim)."""
        sl = self._handle(name).get_slice(name)
        full = tuple(sl.get_shape())
        if full != tuple(shape):
            raise ConfigError(f"tensor {name!r} has shape {list(full)} in the checkpoint, but config.json implies {list(shape)}")
        idx = [slice(None)] * len(full)
        lo = hi = 0
        if shard.dim is not None:
            lo, hi = shard.bounds(full[shard.dim])
            idx[shard.dim] = slice(lo, hi)
        return sl[tuple(idx)], full, lo, hi

    def get(self, name: str, shape: tuple[int, ...], shard: ShardSpec = FULL,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        t, _, lo, _ = self._read(name, shape, shard)
        if t.dtype == FP8:
            t = self._dequant(name, t, shard, lo)
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def get_linear(self, name: str, shape: tuple[int, int], shard: ShardSpec = FULL) -> torch.Tensor | Fp8Weight:
        t, full, lo, hi = self._read(name, shape, shard)
        whole = shard.dim is None or aligned(full[shard.dim], self.block[shard.dim], lo, hi)
        if t.dtype == FP8 and self.keep_fp8 and whole:
            scale = self._scales(name)
            if shard.dim is not None:
                scale = shard_scale(scale, self.block, shard.dim, lo, hi)
            return Fp8Weight(t.to(self.device), scale.to(self.device), self.block)
        if t.dtype != FP8 and self.quantize:
            if whole:
                return quantize_block(t.to(self.device), self.block)
            # A shard that splits a block: quantize the full tensor, as a TP size with whole blocks would.
            full_t = self._handle(name).get_tensor(name).to(self.device)
            return _shard_fp8_or_dequant(quantize_block(full_t, self.block), shard, self.dtype)
        if t.dtype == FP8:
            t = self._dequant(name, t, shard, lo)
        return t.to(device=self.device, dtype=self.dtype)

    def _scales(self, name: str) -> torch.Tensor:
        sname = name + "_scale_inv"
        if not self.has(sname):
            raise ConfigError(f"fp8 tensor {name!r} has no {sname!r} block scales")
        return self._handle(sname).get_tensor(sname).float()

    def _dequant(self, name: str, t: torch.Tensor, shard: ShardSpec, lo: int) -> torch.Tensor:
        offset = (lo if shard.dim == 0 else 0, lo if shard.dim == 1 else 0)
        return dequantize_block(t, self._scales(name), self.block, torch.float32, offset)


class DummyReader:
    """Random weights of the real shapes: norms 1, biases 0, matrices N(0, 1/fan_in)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int = 0, quantize: bool = False,
                 block: tuple[int, int] | None = None):
        self.dtype, self.device, self.seed = dtype, device, seed
        self.quantize, self.block = quantize, tuple(block) if block else (128, 128)

    def has(self, name: str) -> bool:
        return True

    def get_linear(self, name: str, shape: tuple[int, int], shard: ShardSpec = FULL) -> torch.Tensor | Fp8Weight:
        if not self.quantize:
            return self.get(name, shape, shard)
        return _shard_fp8_or_dequant(quantize_block(self._full(name, shape), self.block), shard, self.dtype)

    def _full(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith(("norm.weight", "layernorm.weight")):
            return torch.ones(shape, device=self.device)
        if name.endswith("bias"):
            return torch.zeros(shape, device=self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
        return torch.randn(shape, generator=g, device=self.device) * std

    def get(self, name: str, shape: tuple[int, ...], shard: ShardSpec = FULL,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        full = self._full(name, shape)
        if shard.dim is not None:
            lo, hi = shard.bounds(shape[shard.dim])
            full = full.narrow(shard.dim, lo, hi - lo)
        return full.to(dtype or self.dtype).contiguous()
