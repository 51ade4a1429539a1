"""Block-fp8 linear kernels (dcpserve/kernels/fp8_linear.py) against their torch reference, and the fp8 weight
format helpers (dcpserve/loader/fp8.py). Random weights whose rows differ in magnitude (so the blocks' scales
differ), ragged shapes against both the tiles and the scale blocks, the split-K path.

On CPU the kernels run in Triton's interpreter on tiny shapes; on a GPU machine they run on CUDA, where the
last test also takes DeepSeek-V3.2's real shapes."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.kernels.fp8_linear import Fp8GemmConfig, dequant_fp8, fp8_linear, fp8_linear_ref  # noqa: E402
from dcpserve.loader.fp8 import dequantize_block, quantize_block, shard_fp8  # noqa: E402
from tests.kernels._close import assert_rel_close  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEV.type == "cuda"


def _weight(n: int, k: int, block: tuple[int, int], gen: torch.Generator):
    rows = torch.exp(torch.randn(n, 1, generator=gen))  # magnitudes spread over ~e^+-2: distinct scales
    w = quantize_block(torch.randn(n, k, generator=gen) * rows * k ** -0.5, block)
    return w.q.to(DEV), w.scale.to(DEV)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert_rel_close(out, ref, dtype, tol32=2e-6, tol16=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,block", [
    (1, 40, 96, (32, 32)),       # batch-1 decode; 3 scale blocks along K
    (5, 130, 300, (32, 32)),     # N and K ragged against the tiles and the blocks
    (33, 17, 64, (16, 32)),      # several BLOCK_M tiles; non-square blocks
    (3, 64, 128, (128, 128)),    # one block covers the whole (tiny) matrix
])
def test_fp8_linear_matches_ref(dtype, m, n, k, block):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    q, s = _weight(n, k, block, gen)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEV)
    _assert_close(fp8_linear(x, q, s, block), fp8_linear_ref(x, q, s, block), dtype)


@pytest.mark.parametrize("split", [2, 3, 7])
def test_fp8_linear_split_k(split):
    """Split-K partial sums (fixed-order add) equal the unsplit kernel to fp32 rounding; leading dims kept."""
    gen = torch.Generator().manual_seed(split)
    block = (16, 32)
    q, s = _weight(48, 200, block, gen)
    x = torch.randn(2, 3, 200, generator=gen).to(DEV)
    small = {"block_m": 16, "block_n": 16, "block_k": 32, "num_warps": 4 if GPU else 1, "num_stages": 2 if GPU else 1}
    one = fp8_linear(x, q, s, block, Fp8GemmConfig(split_k=1, **small))
    many = fp8_linear(x, q, s, block, Fp8GemmConfig(split_k=split, **small))
    assert many.shape == (2, 3, 48)
    _assert_close(many, one, torch.float32)
    _assert_close(many, fp8_linear_ref(x, q, s, block), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_block_m_128(dtype):
    """BLOCK_M 128 (what decode batches of 65-128 rows take on a GPU) with 100 rows: one M tile, 28 rows masked."""
    gen = torch.Generator().manual_seed(128)
    q, s = _weight(40, 96, (32, 32), gen)
    x = torch.randn(100, 96, generator=gen).to(dtype).to(DEV)
    cfg = Fp8GemmConfig(block_m=128, block_n=16, block_k=32, split_k=2, num_warps=4 if GPU else 1,
                        num_stages=2 if GPU else 1)
    _assert_close(fp8_linear(x, q, s, (32, 32), cfg), fp8_linear_ref(x, q, s, (32, 32)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_fp8_gemv_several_blocks_per_step(dtype, split):
    """The one-row kernel reads two scale blocks per step (BLOCK_K 64, blocks of 32); K = 300 ends inside a
    step and inside a block; N = 37 is ragged against BLOCK_N; split-K on top."""
    gen = torch.Generator().manual_seed(split)
    q, s = _weight(37, 300, (32, 32), gen)
    x = torch.randn(1, 300, generator=gen).to(dtype).to(DEV)
    cfg = Fp8GemmConfig(block_m=1, block_n=16, block_k=64, split_k=split, num_warps=4 if GPU else 1,
                        num_stages=2 if GPU else 1)
    _assert_close(fp8_linear(x, q, s, (32, 32), cfg), fp8_linear_ref(x, q, s, (32, 32)), dtype)
    with pytest.raises(ValueError, match="one input row"):
        fp8_linear(torch.randn(2, 300, device=DEV), q, s, (32, 32), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_kernel_equals_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    block = (16, 32)
    q, s = _weight(70, 100, block, gen)
    assert torch.equal(dequant_fp8(q, s, block, dtype), dequantize_block(q, s, block, dtype))


def test_bad_shapes_and_empty_input():
    gen = torch.Generator().manual_seed(6)
    q, s = _weight(40, 64, (32, 32), gen)
    with pytest.raises(ValueError, match="scale"):
        fp8_linear(torch.randn(1, 64, device=DEV), q, s[:1], (32, 32))
    with pytest.raises(ValueError, match="input features"):
        fp8_linear(torch.randn(1, 63, device=DEV), q, s, (32, 32))
    with pytest.raises(ValueError, match="e4m3"):
        fp8_linear(torch.randn(1, 64, device=DEV), q.float(), s, (32, 32))
    assert fp8_linear(torch.randn(0, 64, device=DEV), q, s, (32, 32)).shape == (0, 40)


def test_quantize_roundtrip_and_aligned_shards():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(96, 160, generator=gen)
    full = quantize_block(w, (32, 32))
    assert full.q.dtype == torch.float8_e4m3fn and full.scale.shape == (3, 5)
    back = dequantize_block(full.q, full.scale, full.block)
    assert ((back - w).abs() <= w.abs() * 2 ** -3 + 1e-6).all()  # e4m3: 3 mantissa bits
    # A shard of whole blocks is the same bytes and scales as that part of the full quantization, so every
    # TP size sees the same weights.
    for dim, lo, hi in ((0, 32, 96), (1, 64, 160), (1, 0, 64)):
        part = shard_fp8(full, dim, lo, hi)
        alone = quantize_block(w.narrow(dim, lo, hi - lo), (32, 32))
        assert torch.equal(part.q.view(torch.uint8), alone.q.view(torch.uint8))
        assert torch.equal(part.scale, alone.scale)
    assert shard_fp8(full, 0, 16, 48) is None  # splits a block


@pytest.mark.skipif(not GPU, reason="real DeepSeek-V3.2 shapes: GPU only")
@pytest.mark.parametrize("m", [1, 2, 4, 32, 100, 300])
@pytest.mark.parametrize("n,k", [(1536, 7168), (24576, 1536), (7168, 16384), (576, 7168), (128, 7168)])
def test_fp8_linear_real_shapes(m, n, k):
    """q_a, q_b, o_proj (TP1), kv_a, indexer wk; m = 100 takes BLOCK_M 128, m = 300 the dequantize + cuBLAS path."""
    gen = torch.Generator().manual_seed(n + k + m)
    q, s = _weight(n, k, (128, 128), gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).to(DEV)
    _assert_close(fp8_linear(x, q, s, (128, 128)), fp8_linear_ref(x, q, s, (128, 128)), torch.bfloat16)
