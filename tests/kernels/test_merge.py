"""LSE merge kernel vs its torch reference and vs attention.merge.merge_partials (TRITON_INTERPRET=1 on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.attention.merge import merge_partials  # noqa: E402
from dcpserve.kernels.merge import merge_lse, merge_lse_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(n: int, lead: tuple[int, ...], v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(n, *lead, v, generator=g)
    lses = torch.randn(n, *lead, generator=g) * 4
    return outs.to(DEV), lses.to(DEV)


def test_merge_matches_ref_with_empty_and_broken_partials():
    outs, lses = make_case(3, (2, 5), 80, seed=0)  # V not a power of two: masked tail
    flat = lses.view(3, -1)
    flat[0, 0] = float("-inf")
    flat[1, 1] = float("nan")
    flat[2, 2] = float("inf")
    flat[:, 3] = float("-inf")  # every partial empty -> 0 / -inf
    flat[0, 4], flat[1, 4] = float("nan"), float("inf")
    outs.view(3, -1, 80)[0, 0] = float("nan")  # garbage in an empty partial must not leak
    out, lse = merge_lse(outs, lses)
    ref_out, ref_lse = merge_lse_ref(outs, lses)
    assert out.shape == (2, 5, 80) and lse.shape == (2, 5)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out.view(-1, 80)[3] == 0) and lse.view(-1)[3] == float("-inf")


def test_merge_bf16_partials_single():
    outs, lses = make_case(1, (7,), 64, seed=1)
    out, lse = merge_lse(outs.bfloat16(), lses)
    torch.testing.assert_close(out, outs[0].bfloat16().float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, lses[0], atol=1e-6, rtol=1e-6)


def test_merge_ref_matches_merge_partials():
    outs, lses = make_case(4, (3, 6), 32, seed=2)
    lses[1, 0, 0] = float("-inf")
    lses[:, 2, 1] = float("-inf")
    lses[2, 1, 3] = float("nan")
    ref_out, ref_lse = merge_lse_ref(outs, lses)
    out, lse = merge_partials(outs, lses)
    torch.testing.assert_close(ref_out, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_lse, lse, atol=1e-6, rtol=1e-6)
