"""Greedy argmax kernel (dcpserve/kernels/argmax.py) against torch.argmax: random rows, ties across and
within column blocks, -inf rows, NaN, ragged widths."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.kernels.argmax import BLOCK, argmax

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,v", [(1, 1), (1, 17), (3, BLOCK), (2, BLOCK + 1), (5, 3 * BLOCK - 7)])
def test_argmax_random(dtype, b, v):
    gen = torch.Generator().manual_seed(b * v)
    x = (torch.randn(b, v, generator=gen) * 5).to(dtype).to(DEV)
    assert torch.equal(argmax(x), torch.argmax(x, dim=-1))


def test_argmax_ties_inf_nan_and_strides():
    v = 2 * BLOCK + 50
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, v + 3, generator=gen).to(DEV)[:, 3:]  # row stride != V
    x[0, [BLOCK + 5, 10, 2 * BLOCK + 1]] = 100.0  # tie across blocks: the first wins
    x[1, [BLOCK + 9, BLOCK + 2]] = 100.0  # tie within a block
    x[2] = float("-inf")  # all -inf: index 0, as torch
    x[3, [20, BLOCK + 3]] = float("inf")
    x[4, BLOCK + 7] = float("nan")  # NaN counts as the largest value
    x[4, 5] = float("inf")
    x[5, [2 * BLOCK + 3, BLOCK + 1]] = float("nan")
    x[6] = 1.0  # all equal
    assert torch.equal(argmax(x), torch.argmax(x, dim=-1))
    assert argmax(x).tolist()[:7] == [10, BLOCK + 2, 0, 20, BLOCK + 7, BLOCK + 1, 0]


def test_argmax_rejects_bad_shapes():
    with pytest.raises(ValueError, match="argmax wants"):
        argmax(torch.randn(3, device=DEV))
    with pytest.raises(ValueError, match="argmax wants"):
        argmax(torch.randn(2, 0, device=DEV))
    assert argmax(torch.randn(0, 5, device=DEV)).shape == (0,)
