"""Checkpoint readers: each rank reads only its own shard of each tensor.

`SafetensorsReader` reads a single file or a sharded checkpoint (`model.safetensors.index.json`),
bf16/fp16/fp32 tensors, and fp8 e4m3 tensors with block scales (`<name>_scale_inv`, fp32,
ceil(out/B) x ceil(in/B)) which it dequantizes at load. `DummyReader` gives deterministic random weights of
the requested shapes: the full tensor is drawn from a seed derived from its name and then sliced, so every
TP/DCP layout of the same seed sees the same model.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Protocol

import torch

from dcpserve.config import ConfigError


class ShardSpec:
    """Which slice of a full tensor a rank needs: `parts` equal pieces along `dim`, piece `index`."""

    def __init__(self, dim: int | None = None, index: int = 0, parts: int = 1):
        self.dim, self.index, self.parts = dim, index, parts

    def bounds(self, size: int) -> tuple[int, int]:
        step = size // self.parts
        return self.index * step, (self.index + 1) * step


FULL = ShardSpec()


class Reader(Protocol):
    def get(self, name: str, shape: tuple[int, ...], shard: ShardSpec = FULL,
            dtype: torch.dtype | None = None) -> torch.Tensor: ...


class SafetensorsReader:
    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, block: tuple[int, int] | None):
        from safetensors import safe_open

        self.dtype, self.device = dtype, device
        self.block = tuple(block) if block else (128, 128)
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

    def get(self, name: str, shape: tuple[int, ...], shard: ShardSpec = FULL,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        full = tuple(sl.get_shape())
        if full != tuple(shape):
            raise ConfigError(f"tensor {name!r} has shape {list(full)} in the checkpoint, but config.json implies {list(shape)}")
        idx = [slice(None)] * len(full)
        lo = hi = None
        if shard.dim is not None:
            lo, hi = shard.bounds(full[shard.dim])
            idx[shard.dim] = slice(lo, hi)
        t = sl[tuple(idx)]
        if t.dtype == torch.float8_e4m3fn:
            t = self._dequant(name, t, full, shard, lo)
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def _dequant(self, name: str, t: torch.Tensor, full: tuple[int, ...], shard: ShardSpec, lo: int | None) -> torch.Tensor:
        sname = name + "_scale_inv"
        if not self.has(sname):
            raise ConfigError(f"fp8 tensor {name!r} has no {sname!r} block scales")
        bo, bi = self.block
        scales = self._handle(sname).get_tensor(sname).float()
        out_off = lo if shard.dim == 0 else 0
        in_off = lo if shard.dim == 1 else 0
        rows = torch.arange(out_off, out_off + t.shape[0]) // bo
        cols = torch.arange(in_off, in_off + t.shape[1]) // bi
        return t.float() * scales[rows][:, cols]


class DummyReader:
    """Random weights of the real shapes: norms 1, biases 0, matrices N(0, 1/fan_in)."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.dtype, self.device, self.seed = dtype, device, seed

    def has(self, name: str) -> bool:
        return True

    def get(self, name: str, shape: tuple[int, ...], shard: ShardSpec = FULL,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            full = torch.ones(shape, device=self.device)
        elif name.endswith("bias"):
            full = torch.zeros(shape, device=self.device)
        else:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            full = torch.randn(shape, generator=g, device=self.device) * std
        if shard.dim is not None:
            lo, hi = shard.bounds(shape[shard.dim])
            full = full.narrow(shard.dim, lo, hi - lo)
        return full.to(dtype or self.dtype).contiguous()
