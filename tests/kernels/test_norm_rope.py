"""RMSNorm (+ residual add) and rope kernels (dcpserve/kernels/rmsnorm.py, rope.py) against their torch
references (the model's own non-Triton path), on random inputs of mixed magnitudes, ragged shapes and strided
views (the model feeds them column slices of wider rows and writes into slices of the latent / query rows).

On CPU the kernels run in Triton's interpreter on small shapes; on a GPU also at the model's real widths."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.kernels.rmsnorm import rms_norm, rms_norm_ref
from dcpserve.kernels.rope import rope, rope_ref

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="real widths need a GPU (the interpreter is slow)")


def _rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Rows whose scales span 1e-3..1e3, so rounding is exercised at every exponent."""
    scale = 10.0 ** (torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen) * 6 - 3)
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEV)


def _ulp_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but for rare differences: the kernel sums squares in another order than torch.mean, which can
    flip the rounding of the normalized value by one ulp; times the weight and rounded again, that is at most
    two ulps of the result."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    bound = 2 * w.abs().clamp_min(1e-30) * torch.finfo(want.dtype).eps
    assert bool(((g - w).abs() <= bound).all()), (g - w).abs().max()
    assert (g != w).float().mean().item() <= 0.01


def _check_norm(got: torch.Tensor, want: torch.Tensor) -> None:
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        _ulp_close(got, want)


CASES = [(1, 16), (5, 100), (37, 64), (3, 512)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,n", CASES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm(dtype, t, n, residual):
    gen = torch.Generator().manual_seed(t * 1000 + n + residual)
    wide = _rand((t, n + 24), dtype, gen)
    x = wide[:, 7 : 7 + n]  # a column slice, as MLA's kv_a row: row stride != n
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype).to(DEV)
    r = _rand((t, n), dtype, gen) if residual else None
    want, want_s = rms_norm_ref(x, w, 1e-6, r)
    got, got_s = rms_norm(x, w, 1e-6, r)
    _check_norm(got, want)
    if residual:
        assert torch.equal(got_s, want_s)  # the residual stream itself is exact: one rounded add
    else:
        assert got_s is None


def test_rms_norm_into_strided_out_and_promotion():
    gen = torch.Generator().manual_seed(7)
    x = _rand((9, 64), torch.bfloat16, gen)
    w32 = (1 + 0.5 * torch.randn(64, generator=gen)).to(DEV)  # fp32 weight: the output is fp32, as in torch
    want, _ = rms_norm_ref(x, w32, 1e-6)
    got, _ = rms_norm(x, w32, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    row = torch.full((9, 80), 5.0, dtype=torch.bfloat16, device=DEV)
    rms_norm(x, w32.bfloat16(), 1e-6, out=row[:, :64])
    _ulp_close(row[:, :64], rms_norm_ref(x, w32.bfloat16(), 1e-6)[0])
    assert bool((row[:, 64:] == 5.0).all())  # nothing written past the slice
    assert rms_norm(x[:0], w32, 1e-6)[0].shape == (0, 64)


def test_rms_norm_rejects_bad_shapes():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, torch.ones(8, device=DEV), 1e-6, residual=torch.randn(4, 9, device=DEV))


@GPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,n", [(1, 7168), (130, 7168), (64, 1536), (257, 512)])
def test_rms_norm_real_widths(dtype, t, n):
    gen = torch.Generator().manual_seed(t + n)
    x, r = _rand((t, n), dtype, gen), _rand((t, n), dtype, gen)
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype).to(DEV)
    want, want_s = rms_norm_ref(x, w, 1e-6, r)
    got, got_s = rms_norm(x, w, 1e-6, r)
    assert torch.equal(got_s, want_s)
    _check_norm(got, want)


def _tables(positions: int, half: int, dtype: torch.dtype, gen: torch.Generator):
    ang = torch.rand(positions, half, generator=gen) * 6.3
    scale = 1 + torch.rand(1, generator=gen)  # YaRN-scaled tables are not unit circles
    return (ang.cos() * scale).to(dtype).to(DEV), (ang.sin() * scale).to(dtype).to(DEV)


def _check_rope(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, pos, cos, sin, interleaved: bool) -> None:
    if want.dtype == torch.float32 and DEV.type == "cuda":
        # fp32 on a GPU: the compiler may fuse a product into the sum (one rounding fewer), an error of an
        # ulp of the products, which is large next to a result that cancels; bound it by the products' size.
        r = x.shape[-1] // 2
        size = torch.cat([rope_ref(x.abs(), pos, cos.abs(), -sin.abs(), interleaved)[..., :r],  # |x1 c| + |x2 s|
                          rope_ref(x.abs(), pos, cos.abs(), sin.abs(), interleaved)[..., r:]], dim=-1)
        assert bool(((got - want).abs() <= size * 2.0 ** -22 + 1e-30).all())
    else:
        assert torch.equal(got, want)  # every product and sum rounded as torch rounds them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(1, 16), (7, 16), (5, 3, 16), (4, 9, 64), (2, 1, 8)])
def test_rope(dtype, interleaved, shape):
    gen = torch.Generator().manual_seed(sum(shape) + interleaved)
    r = shape[-1]
    cos, sin = _tables(50, r // 2, dtype, gen)
    pos = torch.randint(0, 50, (shape[0],), generator=gen).to(DEV)
    # x: the rope columns of a wider row (MLA's q is [T, H, nope + rope]), so both strides are unusual
    wide = _rand((*shape[:-1], r + 12), dtype, gen)
    x = wide[..., 12:]
    x0 = x.clone()
    want = rope_ref(x, pos, cos, sin, interleaved)
    _check_rope(rope(x, pos, cos, sin, interleaved), want, x, pos, cos, sin, interleaved)
    # Into a slice of another tensor (the absorbed query / latent row), and in place.
    dest = torch.zeros((*shape[:-1], r + 5), dtype=dtype, device=DEV)
    rope(x, pos, cos, sin, interleaved, out=dest[..., 5:])
    _check_rope(dest[..., 5:], want, x0, pos, cos, sin, interleaved)
    assert bool((dest[..., :5] == 0).all())
    keep = wide[..., :12].clone()
    rope(x, pos, cos, sin, interleaved, out=x)
    _check_rope(x, want, x0, pos, cos, sin, interleaved)
    assert torch.equal(wide[..., :12], keep)


@GPU
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(1, 128, 64), (300, 32, 64), (77, 64), (33, 64, 64)])
def test_rope_real_shapes(interleaved, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    cos, sin = _tables(5000, 32, torch.bfloat16, gen)
    pos = torch.randint(0, 5000, (shape[0],), generator=gen).to(DEV)
    x = _rand(shape, torch.bfloat16, gen)
    _check_rope(rope(x, pos, cos, sin, interleaved), rope_ref(x, pos, cos, sin, interleaved), x, pos, cos, sin,
                interleaved)


def test_rope_rejects_bad_shapes():
    cos = torch.ones(10, 8, device=DEV)
    with pytest.raises(ValueError, match="rope wants"):
        rope(torch.randn(3, 15, device=DEV), torch.zeros(3, dtype=torch.long, device=DEV), cos, cos, True)
    with pytest.raises(ValueError, match="out"):
        rope(torch.randn(3, 16, device=DEV), torch.zeros(3, dtype=torch.long, device=DEV), cos, cos, True,
             out=torch.empty(3, 17, device=DEV)[:, :16].t().contiguous().t())
