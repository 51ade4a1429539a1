"""Dense paged MLA decode kernel vs its torch reference (TRITON_INTERPRET=1 on CPU, tiny shapes)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.attention.backend import TorchBackend  # noqa: E402
from dcpserve.kernels.mla_decode import decode_rows, mla_decode, mla_decode_ref  # noqa: E402
from dcpserve.kv.formats import LatentFormat  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 3e-2 if DEV == "cuda" else 1e-4  # GPU dots run in bf16; the interpreter in exact fp32


def make_case(kv_lora: int, rope: int, kind: str, lens: list[int], heads: int, page: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    fp8 = kind == "fp8"
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    fmt = LatentFormat(kv_lora, rope, fp8, dtype)
    max_pages = max(1, -(-max(lens) // page))
    n_pages = len(lens) * max_pages + 3
    cache = fmt.encode(torch.randn(n_pages * page, kv_lora + rope, generator=g)).to(DEV)
    # Random, non-contiguous page order so sequences cross page boundaries into unrelated pages.
    block_table = torch.randperm(n_pages, generator=g)[: len(lens) * max_pages].view(len(lens), max_pages)
    q = torch.randn(len(lens), heads, kv_lora + rope, generator=g).to(dtype)
    return (q.to(DEV), cache, block_table.int().to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV), fp8)


@pytest.mark.parametrize("kv_lora,rope,kind,num_splits", [
    (64, 16, "bf16", 1),
    (64, 16, "fp32", 3),
    (256, 16, "fp8", None),  # two fp8 scale blocks per row
    (128, 64, "fp8", 2),
])
def test_decode_matches_ref(kv_lora, rope, kind, num_splits):
    page = 16
    lens = [37, 0, 16, 50]  # ragged; empty; exactly one page; crosses several page boundaries
    q, cache, bt, lens_t, fp8 = make_case(kv_lora, rope, kind, lens, heads=20, page=page, seed=kv_lora + len(kind))
    scale = 0.7 / (kv_lora + rope) ** 0.5
    out, lse = mla_decode(q, cache, bt, lens_t, page, scale, kv_lora, rope, fp8, num_splits=num_splits)
    ref_out, ref_lse = mla_decode_ref(q, cache, bt, lens_t, page, scale, kv_lora, rope, fp8)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(lse, ref_lse, atol=TOL, rtol=TOL)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_decode_all_empty():
    q, cache, bt, lens_t, fp8 = make_case(64, 16, "fp8", [0, 0], heads=4, page=8, seed=1)
    out, lse = mla_decode(q, cache, bt, lens_t, 8, 0.1, 64, 16, fp8, num_splits=2)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_decode_ref_matches_torch_backend():
    page, kv_lora, rope = 8, 64, 16
    q, cache, bt, lens_t, fp8 = make_case(kv_lora, rope, "fp8", [19, 5], heads=4, page=page, seed=3)
    ref_out, ref_lse = mla_decode_ref(q, cache, bt, lens_t, page, 0.2, kv_lora, rope, fp8)
    for b, n in enumerate(lens_t.tolist()):
        j = torch.arange(n, device=DEV)
        rows = bt[b, j // page].long() * page + j % page
        kv = decode_rows(cache, rows, kv_lora, rope, fp8)
        o, l = TorchBackend().attend(q[b : b + 1], kv, kv_lora, 0.2)
        torch.testing.assert_close(ref_out[b], o[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ref_lse[b], l[0], atol=1e-5, rtol=1e-5)
