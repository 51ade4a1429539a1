"""Sparse MLA decode over compacted row lists vs its torch reference (TRITON_INTERPRET=1 on CPU; on a Hopper GPU
also the Gluon kernel it hands the DeepSeek dims to, at real shapes)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.attention.backend import TorchBackend  # noqa: E402
from dcpserve.kernels._common import default_tile  # noqa: E402
from dcpserve.kernels.mla_decode import decode_rows, sm90_kernel  # noqa: E402
from dcpserve.kernels.mla_sparse_decode import mla_sparse_decode, mla_sparse_decode_ref  # noqa: E402
from dcpserve.kv.formats import LatentFormat  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HOPPER = DEV == "cuda" and torch.cuda.get_device_capability()[0] == 9
TOL = 3e-2 if DEV == "cuda" else 1e-4


def make_case(kv_lora: int, rope: int, kind: str, counts: list[int], kmax: int, heads: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    fp8 = kind == "fp8"
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    pool = 256
    cache = LatentFormat(kv_lora, rope, fp8, dtype).encode(torch.randn(pool, kv_lora + rope, generator=g)).to(DEV)
    # Past each count: garbage that must never be dereferenced (-1 and far out of the pool).
    rows = torch.randint(-1, 2**30, (len(counts), kmax), generator=g, dtype=torch.int32)
    rows[:, ::2] = -1
    for b, c in enumerate(counts):
        rows[b, :c] = torch.randperm(pool, generator=g)[:c].int()
    q = torch.randn(len(counts), heads, kv_lora + rope, generator=g).to(dtype)
    return q.to(DEV), cache, rows.to(DEV), torch.tensor(counts, dtype=torch.int32, device=DEV), fp8


@pytest.mark.parametrize("kv_lora,rope,kind,num_splits", [
    (64, 16, "bf16", None),
    (256, 16, "fp8", 2),
    (64, 64, "fp32", 3),
])
def test_sparse_decode_matches_ref(kv_lora, rope, kind, num_splits):
    q, cache, rows, counts, fp8 = make_case(kv_lora, rope, kind, [21, 0, 48, 3], kmax=64, heads=20, seed=kv_lora)
    out, lse = mla_sparse_decode(q, cache, rows, counts, 0.15, kv_lora, rope, fp8, num_splits=num_splits)
    ref_out, ref_lse = mla_sparse_decode_ref(q, cache, rows, counts, 0.15, kv_lora, rope, fp8)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(lse, ref_lse, atol=TOL, rtol=TOL)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_sparse_ref_matches_torch_backend():
    kv_lora, rope = 64, 16
    q, cache, rows, counts, fp8 = make_case(kv_lora, rope, "fp8", [9, 30], kmax=32, heads=4, seed=5)
    ref_out, ref_lse = mla_sparse_decode_ref(q, cache, rows, counts, 0.3, kv_lora, rope, fp8)
    for b, c in enumerate(counts.tolist()):
        kv = decode_rows(cache, rows[b, :c], kv_lora, rope, fp8)
        o, l = TorchBackend().attend(q[b : b + 1], kv, kv_lora, 0.3)
        torch.testing.assert_close(ref_out[b], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref_lse[b], l[0], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("heads", [128, 64, 32, 16])
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("fp8", [False, True])
def test_hopper_kernel_matches_ref(heads, num_splits, fp8):
    """The DeepSeek dims on Hopper run the Gluon dense kernel at page size 1. Ragged counts (0, 1, one and two
    tiles, a whole k), rows in random order, garbage past each count, and every unselected row poisoned."""
    torch.manual_seed(heads * 10 + (num_splits or 0))
    counts = torch.tensor([2048, 0, 1000, 1, 64, 65], dtype=torch.int32, device="cuda")
    pool, kmax = 8192, 2048
    fmt = LatentFormat(512, 64, fp8, torch.bfloat16)
    # Values near 1 (see test_mla_decode_sm90.make_cache: the bf16 rounding of dequantized values).
    cache = fmt.encode(torch.randn(pool, 576, device="cuda"))
    rows = torch.randint(-1, 2**30, (len(counts), kmax), dtype=torch.int32, device="cuda")
    selected = torch.zeros(pool, dtype=torch.bool, device="cuda")
    for b, c in enumerate(counts.tolist()):
        rows[b, :c] = torch.randperm(pool, device="cuda")[:c].int()
        selected[rows[b, :c].long()] = True
    cache[~selected] = 0xFF if fp8 else float("nan")
    q = torch.randn(len(counts), heads, 576, device="cuda").bfloat16()
    assert sm90_kernel(q, cache, 512, 64, fp8) is not None
    out, lse = mla_sparse_decode(q, cache, rows, counts, 0.07, 512, 64, fp8, num_splits=num_splits)
    ref_out, ref_lse = mla_sparse_decode_ref(q, cache, rows, counts, 0.07, 512, 64, fp8)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2 if fp8 else 2e-3, rtol=2e-2 if fp8 else 2e-3)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    # The portable kernel rounds the same bf16 (dequantized) values: only the summation order differs.
    p_out, p_lse = mla_sparse_decode(q, cache, rows, counts, 0.07, 512, 64, fp8, num_splits=num_splits,
                                     config=default_tile(heads, fp8))
    torch.testing.assert_close(out, p_out, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(lse, p_lse, atol=1e-4, rtol=1e-4)
