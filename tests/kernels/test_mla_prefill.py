"""Prefill/extend MLA attention (dense causal and sparse) vs its torch reference (TRITON_INTERPRET=1 on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.attention.backend import TorchBackend  # noqa: E402
from dcpserve.kernels.mla_decode import decode_rows  # noqa: E402
from dcpserve.kernels.mla_prefill import mla_prefill, mla_prefill_ref  # noqa: E402
from dcpserve.kv.formats import LatentFormat  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 3e-2 if DEV == "cuda" else 1e-4


def make_case(kv_lora: int, rope: int, kind: str, ctx: list[int], n_new: list[int], heads: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    fp8 = kind == "fp8"
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    cu_k = torch.tensor([0] + ctx).cumsum(0).int()
    cu_q = torch.tensor([0] + n_new).cumsum(0).int()
    kv = LatentFormat(kv_lora, rope, fp8, dtype).encode(torch.randn(int(cu_k[-1]), kv_lora + rope, generator=g))
    # New tokens are the last n_new positions of each context (an extend after a cached prefix).
    q_pos = torch.cat([torch.arange(c - n, c) for c, n in zip(ctx, n_new)]).int()
    q = torch.randn(int(cu_q[-1]), heads, kv_lora + rope, generator=g).to(dtype)
    return [t.to(DEV) for t in (q, kv, cu_q, cu_k, q_pos)] + [fp8]


def random_topk(q_pos: torch.Tensor, ctx_of_tok: list[int], k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sel = torch.full((q_pos.shape[0], k), -1, dtype=torch.int32)
    for t, c in enumerate(ctx_of_tok):
        n = min(k - 2, c)  # leave -1 padding; some picks lie after q_pos (must be masked: still causal)
        sel[t, :n] = torch.randperm(c, generator=g)[:n].int()
    return sel.to(q_pos.device)


@pytest.mark.parametrize("kv_lora,rope,kind,heads", [(64, 16, "bf16", 4), (128, 64, "fp8", 16), (64, 16, "fp32", 6)])
def test_prefill_dense_matches_ref(kv_lora, rope, kind, heads):
    # seq 0: 6 new tokens over 35 (crosses several key blocks); seq 1: 0 new; seq 2: whole prompt is new
    q, kv, cu_q, cu_k, q_pos, fp8 = make_case(kv_lora, rope, kind, [35, 7, 9], [6, 0, 9], heads, seed=heads)
    out, lse = mla_prefill(q, kv, cu_q, cu_k, q_pos, 0.2, kv_lora, rope, fp8)
    ref_out, ref_lse = mla_prefill_ref(q, kv, cu_q, cu_k, q_pos, 0.2, kv_lora, rope, fp8)
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(lse, ref_lse, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_prefill_sparse_matches_ref(kind):
    ctx, n_new = [40, 12], [3, 4]
    q, kv, cu_q, cu_k, q_pos, fp8 = make_case(64, 16, kind, ctx, n_new, 4, seed=11)
    topk = random_topk(q_pos, [40] * 3 + [12] * 4, k=20, seed=2)
    topk[0, :] = -1  # a query with nothing selected -> 0 / -inf
    topk[1, :] = -1
    topk[1, 5:8] = torch.tensor([39, 38, 37], dtype=torch.int32)  # q_pos 38: position 39 is in the future
    out, lse = mla_prefill(q, kv, cu_q, cu_k, q_pos, 0.2, 64, 16, fp8, topk_pos=topk)
    ref_out, ref_lse = mla_prefill_ref(q, kv, cu_q, cu_k, q_pos, 0.2, 64, 16, fp8, topk_pos=topk)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=TOL)
    torch.testing.assert_close(lse, ref_lse, atol=TOL, rtol=TOL)


def test_prefill_ref_matches_torch_backend():
    ctx, n_new = [10, 6], [4, 6]
    q, kv, cu_q, cu_k, q_pos, fp8 = make_case(64, 16, "bf16", ctx, n_new, 4, seed=4)
    topk = random_topk(q_pos, [10] * 4 + [6] * 6, k=8, seed=9)
    for sel in (None, topk):
        ref_out, ref_lse = mla_prefill_ref(q, kv, cu_q, cu_k, q_pos, 0.2, 64, 16, fp8, topk_pos=sel)
        for i in range(2):
            qa, qb, ka, kb = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
            rows = decode_rows(kv, torch.arange(ka, kb, device=kv.device), 64, 16, fp8)
            mask = torch.arange(kb - ka, device=DEV)[None, :] <= q_pos[qa:qb, None]
            if sel is not None:
                picked = torch.zeros_like(mask)
                for t in range(qa, qb):
                    s = sel[t][sel[t] >= 0].long()
                    picked[t - qa, s] = True
                mask &= picked
            o, l = TorchBackend().attend(q[qa:qb], rows, 64, 0.2, mask)
            torch.testing.assert_close(ref_out[qa:qb], o, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref_lse[qa:qb], l, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_elems", [1 << 24, 300])  # one block; a few queries per block
def test_torch_backend_sparse_prefill_equals_masked_attention(monkeypatch, block_elems):
    """TorchBackend.prefill gathers the selected rows per query (attend_selected) instead of masking the whole
    context: same result as attention with mask causal & selected, with -1 padding, picks past q_pos and a
    query that selects nothing."""
    import dcpserve.attention.backend as backend_mod

    monkeypatch.setattr(backend_mod, "SELECTED_BLOCK_ELEMS", block_elems)
    ctx, n_new = [40, 12], [5, 4]
    q, kv, cu_q, cu_k, q_pos, fp8 = make_case(64, 16, "fp32", ctx, n_new, 4, seed=21)
    topk = random_topk(q_pos, [40] * 5 + [12] * 4, k=16, seed=3)
    topk[0, :] = -1
    topk[1, :] = -1  # selections are unique per query, as the indexer's top-k gives them
    topk[1, 2:7] = torch.tensor([39, 38, 36, 5, 0], dtype=torch.int32)  # q_pos 36: 37+ are in the future
    fmt = LatentFormat(64, 16, fp8, torch.float32)
    rows_all = fmt.decode(kv)
    out, lse = TorchBackend().prefill(q, rows_all, cu_q.tolist(), cu_k.tolist(), q_pos.long(), 0.2, fmt, topk)
    for i in range(2):
        qa, qb, ka, kb = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        mask = torch.arange(kb - ka, device=DEV)[None, :] <= q_pos[qa:qb, None].long()
        picked = torch.zeros_like(mask)
        for t in range(qa, qb):
            picked[t - qa, topk[t][topk[t] >= 0].long()] = True
        o, l = TorchBackend().attend(q[qa:qb], rows_all[ka:kb], 64, 0.2, mask & picked)
        torch.testing.assert_close(out[qa:qb], o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[qa:qb], l, atol=1e-5, rtol=1e-5)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


def test_prefill_bench_tiny_matches_ref(tmp_path):
    # The prefill benchmark's engine-shaped chunks (dense first chunk, sparse second) at small sizes.
    from dcpserve.bench.kernels_prefill import main
    assert main(["--tiny", "--out", str(tmp_path / "prefill.json")]) == 0
