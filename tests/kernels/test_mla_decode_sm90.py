"""Hopper Gluon dense decode (`mla_decode_sm90`) vs the torch reference on GPU; on CPU, an ahead-of-time
compile for sm_90a (Triton ships ptxas) that checks the kernel builds, fits shared memory, keeps its
registers without spilling and runs on the tensor cores (HGMMA in the SASS)."""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")

from dcpserve.kernels import mla_decode_sm90 as sm90  # noqa: E402
from dcpserve.kernels._common import default_tile  # noqa: E402
from dcpserve.kernels.mla_decode import mla_decode, mla_decode_ref, sm90_kernel  # noqa: E402
from dcpserve.kv.formats import LatentFormat  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
SMEM_LIMIT = 232448  # bytes a block may use on H100/H200


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                    "ptxas")), reason="this Triton ships no ptxas")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("page", [64, 16, 1])  # a tile inside one page / over 4 pages / sparse decode's row lists
@pytest.mark.parametrize("heads", [128, 32, 16])  # the 64-head kernel, the swapped one at 32 / 16 heads
def test_compiles_for_sm90a(fp8, page, heads):
    # A fresh interpreter without TRITON_INTERPRET (conftest sets it for the CPU session).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from dcpserve.kernels.mla_decode_sm90 import compile_sm90a; "
            f"print(json.dumps(compile_sm90a(page={page}, fp8={fp8}, heads={heads})))")
    r = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True, timeout=300).stdout)
    assert r["shared"] <= SMEM_LIMIT
    assert "0 bytes spill stores" in r["ptxas"] and "0 bytes stack frame" in r["ptxas"], r["ptxas"]
    # ptxas serializes every wgmma of a kernel when it finds this (see the swapped kernel's empty split).
    assert "C7515" not in r["ptxas"], r["ptxas"]
    if heads > 32:
        # 64x32 score MMAs (each warpgroup its 32 of the 64 keys), 64x256 P V MMAs (its 256 value columns).
        assert "HGMMA.64x32x16.F32.BF16" in r["sass"] and "HGMMA.64x256x16.F32.BF16" in r["sass"]
    else:
        # Swapped: every MMA has N = the warpgroup's heads (K's 64 keys or V^T's 512 rows are the M).
        assert {w for w in r["sass"].split() if w.startswith("HGMMA")} == {f"HGMMA.64x{heads // 2}x16.F32.BF16"}
        assert ".tnspA" in r["sass"]  # V^T read from the K stage as stored
    assert "LDGSTS.E.BYPASS.128" in r["sass"]  # 16-byte cp.async gathers
    if fp8:  # latent bytes: 16-byte loads into registers, hardware e4m3 unpacking
        assert "LDG.E.128" in r["sass"] and "F2FP.F16.E4M3.UNPACK_B" in r["sass"]


def test_not_used_off_hopper():
    q = torch.randn(2, 128, 576, dtype=torch.bfloat16)
    cache = torch.randn(64, 576, dtype=torch.bfloat16)
    assert sm90_kernel(q, cache, 512, 64, False) is None  # CPU tensors
    assert not sm90.supported(q, cache, 512, 64, True)  # and a bf16 cache is not the fp8 format


def make_cache(rows: int, fp8: bool) -> torch.Tensor:
    if not fp8:
        return torch.randn(rows, 576, dtype=torch.bfloat16, device="cuda")
    # Each 128-value block gets its own scale (its amax), so a scale applied to the wrong block shows. Values
    # stay near 1: the kernel rounds e4m3 * scale to bf16 for the MMA (as the portable kernel does), and at
    # 4x larger values that rounding alone moves some outputs by 0.1 against the fp32 reference (H200).
    return LatentFormat(512, 64, True, torch.bfloat16).encode(torch.randn(rows, 576, device="cuda"))


@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.parametrize("page", [64, 16, 1])
# 33-63: zero query rows pad the 64-row tile; <= 32: the swapped kernel (heads are the MMA's N, 16 or 32)
@pytest.mark.parametrize("heads", [128, 96, 64, 40, 32, 20, 16, 8, 1])
@pytest.mark.parametrize("num_splits", [1, 5, None])
@pytest.mark.parametrize("fp8", [False, True])
def test_matches_ref(page, heads, num_splits, fp8):
    torch.manual_seed(page * 1000 + heads)
    lens = torch.tensor([4100, 0, 999, 64, 1, 65], dtype=torch.int32, device="cuda")
    b, max_pages = lens.shape[0], 4100 // page + 1
    cache = make_cache(b * max_pages * page, fp8)
    bt = torch.randperm(b * max_pages, device="cuda").view(b, max_pages).int()
    # Poison every row no sequence owns (page tails included): none may reach the result.
    owned = torch.zeros(cache.shape[0], dtype=torch.bool, device="cuda")
    for i, n in enumerate(lens.tolist()):
        j = torch.arange(n, device="cuda")
        owned[bt[i, j // page].long() * page + j % page] = True
    if fp8:
        cache[~owned] = 0xFF  # e4m3 NaN bytes, NaN scales, NaN rope
    else:
        cache[~owned] = float("nan")
    q = torch.randn(b, heads, 576, device="cuda").bfloat16()
    assert sm90_kernel(q, cache, 512, 64, fp8) is sm90
    out, lse = mla_decode(q, cache, bt, lens, page, 0.07, 512, 64, fp8, num_splits=num_splits)
    ref_out, ref_lse = mla_decode_ref(q, cache, bt, lens, page, 0.07, 512, 64, fp8)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    # fp8: a one-key sequence's LSE is its score, which the bf16 rounding of the dequantized key moves by up to
    # 0.011 here (H200; the portable kernel the same); the comparison with the portable kernel below is tight.
    lse_tol = 2e-2 if fp8 else 2e-3
    torch.testing.assert_close(lse, ref_lse, atol=lse_tol, rtol=lse_tol)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    if fp8:  # the portable kernel rounds the dequantized values the same way: only the summation order differs
        p_out, p_lse = mla_decode(q, cache, bt, lens, page, 0.07, 512, 64, fp8, num_splits=num_splits,
                                  config=default_tile(heads, fp8))
        torch.testing.assert_close(out, p_out, atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(lse, p_lse, atol=1e-4, rtol=1e-4)
