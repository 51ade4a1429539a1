"""KV-write kernels (dcpserve/kernels/kv_write.py) against their torch references, byte for byte.

On CPU the kernels run in Triton's interpreter on tiny shapes; on a GPU machine they run on CUDA."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.kernels.kv_write import (  # noqa: E402
    write_index_keys,
    write_index_keys_ref,
    write_latent,
    write_latent_ref,
)
from dcpserve.kv.formats import IndexKeyFormat, LatentFormat  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _values(t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random rows whose magnitudes span 1e-7..1e3 (e4m3 subnormals, saturation, all rounding cases);
    one all-zero row exercises the scale floor."""
    mag = 10.0 ** (torch.rand(t, 1, generator=gen) * 10 - 7)
    x = torch.randn(t, d, generator=gen) * mag
    if t > 2:
        x[1] = 0.0
    return x.to(dtype).to(DEV)


def _rows(t: int, n_rows: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Distinct owned rows plus several tokens sent to the dummy row (the last one), as DCP does."""
    rows = torch.randperm(n_rows - 1, generator=gen)[:t]
    rows[torch.arange(t) % 3 == 2] = n_rows - 1
    return rows.to(dtype).to(DEV)


def _check(cache: torch.Tensor, ref: torch.Tensor, before: torch.Tensor, rows: torch.Tensor) -> None:
    """Owned rows equal the reference byte for byte; rows nobody wrote are untouched. The dummy row's
    content is unspecified: on GPU, concurrent writers' bytes may interleave there."""
    dummy = cache.shape[0] - 1
    assert torch.equal(cache[:dummy].view(torch.uint8), ref[:dummy].view(torch.uint8))
    written = set(rows.tolist())
    untouched = [r for r in range(dummy) if r not in written]
    assert torch.equal(cache[untouched].view(torch.uint8), before[untouched].view(torch.uint8))


def _check_engine_encode(cache: torch.Tensor, rows: torch.Tensor, x: torch.Tensor,
                         fmt: LatentFormat | IndexKeyFormat) -> None:
    """Owned rows hold exactly what the engine's encoder writes, run on CPU (IEEE division; on CUDA,
    formats.encode divides by 448 through a reciprocal and may differ by one scale ulp)."""
    owned = rows != cache.shape[0] - 1
    got = cache[rows[owned]].view(torch.uint8).cpu()
    assert torch.equal(got, fmt.encode(x.cpu()[owned.cpu()]).view(torch.uint8))


@pytest.mark.parametrize("kv_lora,rope", [(512, 64), (64, 16), (200, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp8", [True, False])
def test_write_latent_matches_ref(kv_lora: int, rope: int, dtype: torch.dtype, fp8: bool) -> None:
    gen = torch.Generator().manual_seed(kv_lora + rope + int(fp8))
    fmt = LatentFormat(kv_lora, rope, fp8, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    n_rows, t = 23, 11
    cache = fmt.empty(n_rows, DEV)
    cache.view(torch.uint8).copy_(torch.randint(0, 256, cache.view(torch.uint8).shape, generator=gen))
    before, ref = cache.clone(), cache.clone()
    kv = _values(t, kv_lora + rope, dtype, gen)
    rows = _rows(t, n_rows, gen, torch.int64 if kv_lora == 512 else torch.int32)
    write_latent(cache, rows, kv, fp8, kv_lora, rope)
    write_latent_ref(ref, rows, kv, fp8, kv_lora, rope)
    _check(cache, ref, before, rows)
    _check_engine_encode(cache, rows, kv, fmt)


@pytest.mark.parametrize("di", [128, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp8", [True, False])
def test_write_index_keys_matches_ref(di: int, dtype: torch.dtype, fp8: bool) -> None:
    gen = torch.Generator().manual_seed(di + int(fp8))
    fmt = IndexKeyFormat(di, fp8, dtype)
    n_rows, t = 19, 9
    cache = fmt.empty(n_rows, DEV)
    cache.view(torch.uint8).copy_(torch.randint(0, 256, cache.view(torch.uint8).shape, generator=gen))
    before, ref = cache.clone(), cache.clone()
    k = _values(t, di, torch.float32, gen)
    rows = _rows(t, n_rows, gen, torch.int32)
    write_index_keys(cache, rows, k, fp8)
    write_index_keys_ref(ref, rows, k, fp8)
    _check(cache, ref, before, rows)
    _check_engine_encode(cache, rows, k, fmt)


def test_fp32_input_to_bf16_cache_rounds_to_nearest_even() -> None:
    # fp32 values exactly halfway between bf16 neighbours: truncation would differ from torch.
    base = torch.randn(6, 48, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    kv = (base.view(torch.int32) + 0x8000).view(torch.float32).to(DEV)
    cache = torch.zeros(7, 48, dtype=torch.bfloat16, device=DEV)
    rows = torch.arange(6, device=DEV)
    write_latent(cache, rows, kv, False, 32, 16)
    assert torch.equal(cache[:6], kv.to(torch.bfloat16))


def test_empty_write_is_noop() -> None:
    cache = LatentFormat(64, 16, True, torch.bfloat16).empty(4, DEV)
    write_latent(cache, torch.empty(0, dtype=torch.long, device=DEV), torch.empty(0, 80, device=DEV), True, 64, 16)
    assert not cache.any()


@pytest.mark.parametrize("kv_lora,rope", [(512, 64), (200, 8)])
def test_latent_ref_equals_engine_encode(kv_lora: int, rope: int) -> None:
    gen = torch.Generator().manual_seed(kv_lora)
    kv = _values(64, kv_lora + rope, torch.float32, gen).cpu()
    fmt = LatentFormat(kv_lora, rope, True, torch.bfloat16)
    ref = torch.zeros(65, fmt.row_bytes, dtype=torch.uint8)
    write_latent_ref(ref, torch.arange(64), kv, True, kv_lora, rope)
    assert torch.equal(ref[:64], fmt.encode(kv))
    plain = torch.zeros(65, kv_lora + rope, dtype=torch.bfloat16)
    write_latent_ref(plain, torch.arange(64), kv, False, kv_lora, rope)
    assert torch.equal(plain[:64], LatentFormat(kv_lora, rope, False, torch.bfloat16).encode(kv))


def test_index_key_ref_equals_engine_encode() -> None:
    k = _values(64, 128, torch.float32, torch.Generator().manual_seed(5)).cpu()
    fmt = IndexKeyFormat(128, True, torch.bfloat16)
    ref = torch.zeros(65, fmt.row_bytes, dtype=torch.uint8)
    write_index_keys_ref(ref, torch.arange(64), k, True)
    assert torch.equal(ref[:64], fmt.encode(k))
