"""Indexer scoring kernel (also fused with top-k key packing) and the owned-row compaction
(dcpserve/kernels/indexer.py) against their references.

On CPU the kernel runs in Triton's interpreter on tiny shapes; on a GPU machine it runs on CUDA."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.attention.indexer import compact_owned as compact_owned_torch  # noqa: E402
from dcpserve.attention.indexer import index_scores  # noqa: E402
from dcpserve.attention.topk import EMPTY_KEY, PAD_POS, key_positions, pack_keys  # noqa: E402
from dcpserve.kernels.indexer import compact_owned, indexer_keys_ref, indexer_scores, indexer_scores_ref  # noqa: E402
from dcpserve.kv.formats import IndexKeyFormat  # noqa: E402
from dcpserve.kv.layout import SlotLayout  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(lens: list[int], page_size: int, hi: int, di: int, cache_kind: str, q_dtype: torch.dtype,
          seed: int) -> dict:
    """Random queries/weights and a paged cache whose pages are shuffled across sequences."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    pages_per_seq = max(1, max(-(-n // page_size) for n in lens))
    n_pages = b * pages_per_seq + 2
    fp8 = cache_kind == "fp8"
    fmt = IndexKeyFormat(di, fp8, torch.float32 if cache_kind == "fp32" else torch.bfloat16)
    keys = torch.randn(n_pages * page_size, di, generator=gen) * (1 + 3 * torch.rand(n_pages * page_size, 1, generator=gen))
    cache = fmt.encode(keys).to(DEV)
    block_table = torch.randperm(n_pages, generator=gen)[: b * pages_per_seq].view(b, pages_per_seq)
    # Entries past a sequence's last page hold garbage: the kernel must never read them.
    for i, n in enumerate(lens):
        block_table[i, -(-n // page_size):] = -1
    q = torch.randn(b, hi, di, generator=gen).to(q_dtype)
    w = torch.randn(b, hi, generator=gen) * hi ** -0.5
    return dict(q=q.to(DEV), w=w.to(DEV), cache=cache, block_table=block_table.to(torch.int32).to(DEV),
                lens=torch.tensor(lens, dtype=torch.int32, device=DEV), page_size=page_size,
                scale=di ** -0.5, fp8=fp8)


def _assert_scores(out: torch.Tensor, ref: torch.Tensor, lens: list[int], tol: float) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape
    for i, n in enumerate(lens):
        assert torch.isneginf(out[i, n:]).all()
    live = torch.isfinite(ref)
    assert torch.isfinite(out[live]).all()
    err = (out[live] - ref[live]).abs().max().item() if live.any() else 0.0
    assert err <= tol * max(1.0, ref[live].abs().max().item() if live.any() else 1.0), err


@pytest.mark.parametrize("cache_kind", ["fp8", "bf16", "fp32"])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("swap_ab", [False, True])
def test_indexer_scores_matches_ref(cache_kind: str, q_dtype: torch.dtype, swap_ab: bool) -> None:
    lens = [37, 0, 1, 130, 16]  # ragged, empty, single token, several pages, exactly one page
    c = _case(lens, 16, 16, 64, cache_kind, q_dtype, seed=len(cache_kind) + q_dtype.itemsize)
    out = indexer_scores(**c, swap_ab=swap_ab)
    ref = indexer_scores_ref(**c)
    # fp32 tiles on CPU / fp32 queries; bf16 queries on GPU run bf16 tensor-core dots of exact operands.
    exact_f32 = q_dtype == torch.float32 or cache_kind == "fp32" or DEV.type == "cpu"
    _assert_scores(out, ref, lens, 1e-5 if exact_f32 else 1e-3)


@pytest.mark.parametrize("tiles_per_prog", [2, 3])
def test_indexer_scores_multi_tile_programs_and_wider_output(tiles_per_prog: int) -> None:
    lens = [150, 3, 64, 0]
    c = _case(lens, 32, 16, 64, "fp8", torch.float32, seed=7)
    out = indexer_scores(**c, max_len=200, block_n=16, tiles_per_prog=tiles_per_prog, swap_ab=tiles_per_prog == 3)
    ref = indexer_scores_ref(**c, max_len=200)
    _assert_scores(out, ref, lens, 1e-5)


def test_indexer_all_empty() -> None:
    c = _case([0, 0], 16, 16, 64, "fp8", torch.float32, seed=1)
    assert indexer_scores(**c).shape == (2, 0)
    out = indexer_scores(**c, max_len=5)
    assert torch.isneginf(out).all()


@pytest.mark.parametrize("fp8", [True, False])
def test_indexer_ref_equals_engine_index_scores(fp8: bool) -> None:
    lens = [21, 40]
    c = _case(lens, 8, 16, 64, "fp8" if fp8 else "fp32", torch.float32, seed=11)
    ref = indexer_scores_ref(**c).cpu()
    fmt = IndexKeyFormat(64, fp8, torch.float32)  # fp32 decode: the exact dequantized keys
    for i, n in enumerate(lens):
        j = torch.arange(n)
        rows = c["block_table"][i].cpu().long()[j // 8] * 8 + j % 8
        keys = fmt.decode(c["cache"].cpu()[rows])
        want = index_scores(c["q"][i : i + 1].cpu(), c["w"][i : i + 1].cpu(), keys, c["scale"])[0]
        torch.testing.assert_close(ref[i, :n], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ fused keys and compaction
def _key_scores(keys: torch.Tensor) -> torch.Tensor:
    """The fp32 score packed in a key's high 32 bits (inverse of pack_keys' monotone map)."""
    mono = (keys >> 32).to(torch.int32)
    return torch.where(mono < 0, mono ^ 0x7FFFFFFF, mono).view(torch.float32)


@pytest.mark.parametrize("interleave,dcp,rank", [(1, 1, 0), (1, 4, 3), (4, 2, 1), (2, 4, 0)])
@pytest.mark.parametrize("cache_kind", ["fp8", "bf16"])
def test_indexer_keys_fuse_scores_and_positions(interleave: int, dcp: int, rank: int, cache_kind: str) -> None:
    """keys=(I, d, r) is bit-identical to packing the same kernel's scores with the layout's position table,
    and close to the torch reference (positions exact, scores to rounding); EMPTY_KEY past lens."""
    lens = [37, 0, 1, 130, 16]
    c = _case(lens, 16, 16, 64, cache_kind, torch.float32, seed=interleave * 10 + dcp + rank)
    max_len = 160
    keys = indexer_scores(**c, max_len=max_len, keys=(interleave, dcp, rank))
    scores = indexer_scores(**c, max_len=max_len)
    lay = SlotLayout(16, dcp, interleave)
    pos = lay.local_position_table(rank, c["lens"].cpu(), max_len, PAD_POS).to(DEV)
    assert keys.dtype == torch.int64 and keys.shape == (len(lens), max_len)
    assert torch.equal(keys, pack_keys(scores, pos))  # pos is PAD_POS past lens, where scores are -inf
    ref = indexer_keys_ref(**c, max_len=max_len, positions=pos)
    assert torch.equal(key_positions(keys), key_positions(ref))
    for i, n in enumerate(lens):
        assert (keys[i, n:] == EMPTY_KEY).all()
    _assert_scores(_key_scores(keys), _key_scores(ref), lens, 1e-5)


@pytest.mark.parametrize("page,dcp,interleave", [(4, 1, 1), (4, 2, 1), (8, 4, 2), (2, 3, 2), (16, 2, 16)])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_compact_owned_kernel_matches_torch(page: int, dcp: int, interleave: int, k: int) -> None:
    """Random selected keys (ragged: some rows short of k, one empty, one all-owned-by-one-rank) over shuffled
    block tables: the same rows in the same order and the same counts as the torch reference, zeros behind."""
    gen = torch.Generator().manual_seed(page * 100 + dcp * 10 + k)
    lay = SlotLayout(page, dcp, interleave)
    ctx = [200, 5, 0, 3 * k + 1, 64]
    n_pages = [lay.pages_needed(c) for c in ctx]
    width = max(n_pages)
    perm = torch.randperm(sum(n_pages) + 5, generator=gen)
    table = torch.full((len(ctx), width), -1, dtype=torch.int32)
    o = 0
    for i, n in enumerate(n_pages):
        table[i, :n] = perm[o : o + n].int()
        o += n
    keys = torch.full((len(ctx), k), EMPTY_KEY, dtype=torch.int64)
    for i, c in enumerate(ctx):
        m = min(k, c)
        p = torch.randperm(c, generator=gen)[:m]
        if i == 4:  # every selected token on one rank
            p = torch.arange(c)[lay.owner_of_position(torch.arange(c)) == dcp - 1][:m]
            m = len(p)
        s = torch.randn(m, generator=gen)
        keys[i, :m] = pack_keys(s, p)
        keys[i] = keys[i, torch.randperm(k, generator=gen)]  # any order, padding anywhere
    for rank in range(dcp):
        want_rows, want_counts = compact_owned_torch(keys, table.long(), lay, rank, k)
        rows, counts = compact_owned(keys.to(DEV), table.to(DEV), interleave, dcp, rank, page)
        assert rows.dtype == torch.int32 and counts.dtype == torch.int32
        assert counts.cpu().tolist() == want_counts.tolist()
        assert torch.equal(rows.cpu().long(), want_rows)  # the reference zero-fills behind the count too


@pytest.mark.parametrize("cache_kind", ["fp8", "bf16", "fp32"])
@pytest.mark.parametrize("k", [24, 200])  # fewer than the context, and more (then -1 padded)
def test_prefill_topk_matches_torch_backend(cache_kind: str, k: int) -> None:
    """Prefill selection through the scoring kernel (TritonBackend.index_prefill_topk: one query per kernel
    "sequence" over a flat context, causal through the lengths) equals the torch path's fp32 scores + ordered
    top-k, positions and their order both, for an extend chunk (queries at positions 97..146 of a 147-token
    context; not a multiple of the key tile). Where two scores differ by rounding only (the kernel sums in
    another order), either order is right: such positions are compared by score, not by index."""
    from dcpserve.attention.backend import TorchBackend
    from dcpserve.attention.triton_backend import TritonBackend

    gen = torch.Generator().manual_seed(7)
    m, n, hi, di = 147, 50, 16, 64
    # fp8 rows decode to fp32 here: the torch path rounds dequantized keys to the model dtype (bf16 in
    # serving, as its decode path does), the kernel multiplies the e4m3 values by the row scale after the dot.
    fmt = IndexKeyFormat(di, cache_kind == "fp8", torch.bfloat16 if cache_kind == "bf16" else torch.float32)
    rows = fmt.encode(torch.randn(m, di, generator=gen) * (1 + 3 * torch.rand(m, 1, generator=gen))).to(DEV)
    q = torch.randn(n, hi, di, generator=gen).to(DEV)
    w = (torch.randn(n, hi, generator=gen) * hi ** -0.5).to(DEV)
    q_pos = torch.arange(m - n, m, device=DEV)
    want = TorchBackend().index_prefill_topk(q, w, rows, q_pos, di ** -0.5, fmt, k)
    got = TritonBackend().index_prefill_topk(q, w, rows, q_pos, di ** -0.5, fmt, k)
    assert got.dtype == torch.int32 and got.shape == (n, k)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEV).expand(n, 1)
    ref = indexer_scores_ref(q, w, rows, table, (q_pos + 1).int(), m, di ** -0.5, fmt.fp8, max_len=m)  # fp32
    near = 1e-6 * ref[torch.isfinite(ref)].abs().max()  # rounding, not ranking
    for t in range(n):  # the causal count, then padding
        real = min(k, int(q_pos[t]) + 1)
        assert (got[t, :real] >= 0).all() and (got[t, :real] <= q_pos[t]).all() and (got[t, real:] == -1).all()
        assert (want[t, real:] == -1).all()
        differ = got[t, :real] != want[t, :real]
        # Each place of the ordered top-k holds positions of the same score (to rounding) in both lists.
        gap = ref[t, got[t, :real][differ].long()] - ref[t, want[t, :real][differ].long()]
        assert bool((gap.abs() <= near).all())
        assert len(set(got[t, :real].tolist())) == real
    assert (got != want).float().mean() < 0.01  # rounding ties stay rare
