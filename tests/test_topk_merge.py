"""Property tests of the deterministic top-k (and its distributed form, simulated in one process) and of the
LSE merge of partial attention results (DESIGN section 2, steps 4-6, and the "Known failure modes")."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcpserve.attention.backend import TorchBackend
from dcpserve.attention.indexer import causal_topk_positions
from dcpserve.attention.merge import merge_partials, merge_weights, sanitize_lse
from dcpserve.attention.topk import (EMPTY_KEY, MAX_POSITION, PAD_POS, key_positions, ordered_topk, pack_keys,
                                     packed_topk, topk_keys)
from dcpserve.kv.layout import SlotLayout

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NEG = float("-inf")


def brute_topk(scores: list[float], positions: list[int], k: int) -> tuple[list[float], list[int]]:
    """Reference: python sort by (score desc, position asc), padded with (-inf, PAD_POS) to length k."""
    pairs = sorted(zip(scores, positions), key=lambda sp: (-sp[0], sp[1]))[:k]
    pairs += [(NEG, PAD_POS)] * (k - len(pairs))
    return [s for s, _ in pairs], [p for _, p in pairs]


# Small integer-valued scores: many ties; -inf entries (masked keys) too.
tie_scores = st.lists(st.one_of(st.integers(-3, 3).map(float), st.just(NEG)), min_size=0, max_size=40)


@st.composite
def score_sets(draw):
    scores = draw(tie_scores)
    n = len(scores)
    # Distinct global positions, not necessarily sorted or contiguous.
    positions = draw(st.lists(st.integers(0, 500), min_size=n, max_size=n, unique=True))
    k = draw(st.integers(1, n + 5))
    return scores, positions, k


# -- ordered_topk ---------------------------------------------------------------------------------------


@SETTINGS
@given(score_sets())
def test_ordered_topk_equals_bruteforce(args):
    """k <= n: exactly the python sort by (score desc, position asc), ties and -inf entries included."""
    scores, positions, k = args
    k = min(k, len(scores))
    if k == 0:
        return
    s = torch.tensor(scores, dtype=torch.float32).view(1, -1)
    p = torch.tensor(positions, dtype=torch.long).view(1, -1)
    ts, tp = ordered_topk(s, p, k)
    assert ts.shape == (1, k) and tp.shape == (1, k)
    bs, bp = brute_topk(scores, positions, k)
    assert tp[0].tolist() == bp
    assert ts[0].tolist() == bs


@SETTINGS
@given(st.lists(st.integers(-3, 3).map(float), min_size=0, max_size=30), st.integers(1, 10), st.data())
def test_ordered_topk_k_above_n_keeps_all_finite_entries_first(scores, extra, data):
    """k > n, finite scores: all n entries first, in brute-force order, then k - n padding entries (-inf)."""
    n = len(scores)
    positions = data.draw(st.lists(st.integers(0, 500), min_size=n, max_size=n, unique=True))
    k = n + extra
    ts, tp = ordered_topk(torch.tensor(scores, dtype=torch.float32).view(1, -1),
                          torch.tensor(positions, dtype=torch.long).view(1, -1), k)
    assert ts.shape == (1, k) and tp.shape == (1, k)
    bs, bp = brute_topk(scores, positions, k)
    assert tp[0, :n].tolist() == bp[:n]
    assert ts[0].tolist() == bs
    assert not any(0 <= x <= 500 for x in tp[0, n:].tolist()), "padding must not look like a real position"


@SETTINGS
@given(score_sets(), st.integers(1, 10))
def test_ordered_topk_k_above_n_pads_with_pad_pos(args, extra):
    """The docstring contract: k > n gives the brute-force order padded with (-inf, PAD_POS)."""
    scores, positions, _ = args
    k = len(scores) + extra
    ts, tp = ordered_topk(torch.tensor(scores, dtype=torch.float32).view(1, -1),
                          torch.tensor(positions, dtype=torch.long).view(1, -1), k)
    bs, bp = brute_topk(scores, positions, k)
    assert tp[0].tolist() == bp
    assert ts[0].tolist() == bs


def test_ordered_topk_padding_minimal():
    """Input scores [1, -inf] at positions [5, 3], k = 4. Expected positions [5, 3, PAD_POS, PAD_POS];
    got [5, INT64_MIN, INT64_MIN, 3] (topk.py, the F.pad(positions, ..., value=PAD_POS) line)."""
    ts, tp = ordered_topk(torch.tensor([[1.0, NEG]]), torch.tensor([[5, 3]]), 4)
    assert tp[0].tolist() == [5, 3, PAD_POS, PAD_POS]


@SETTINGS
@given(st.lists(score_sets(), min_size=1, max_size=4), st.integers(1, 12))
def test_ordered_topk_batched_rows_are_independent(sets, k):
    """Several rows at once (a batch of queries) give each row's own brute-force answer. Short rows are filled
    with (-inf, PAD_POS) entries, which the reference sees as ordinary entries."""
    n = max(len(s) for s, _, _ in sets)
    k = min(k, n)
    if k == 0:
        return
    S = torch.full((len(sets), n), NEG)
    P = torch.full((len(sets), n), PAD_POS, dtype=torch.long)
    for i, (s, p, _) in enumerate(sets):
        S[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
        P[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    ts, tp = ordered_topk(S, P, k)
    for i in range(len(sets)):
        bs, bp = brute_topk(S[i].tolist(), P[i].tolist(), k)
        assert tp[i].tolist() == bp
        assert ts[i].tolist() == bs


# -- packed_topk (the backends' top-k) -------------------------------------------------------------------
def _tied_scores(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Integer-valued scores in a narrow range (many ties), some -inf, some -0.0/+0.0."""
    s = torch.randint(-3, 4, shape, generator=gen).float()
    s[torch.rand(shape, generator=gen) < 0.2] = float("-inf")
    zero = s == 0
    s[zero & (torch.rand(shape, generator=gen) < 0.5)] = -0.0
    return s


@pytest.mark.parametrize("n,k", [(50, 7), (50, 50), (13, 20), (300, 64), (1, 1)])
def test_packed_topk_matches_ordered_topk(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    for shape in [(4, n), (2, 3, n)]:
        scores = _tied_scores(shape, gen)
        # Unique positions spread over the whole supported range, incl. above 2^31, plus PAD_POS entries
        # (as in gathered candidate lists).
        pos = torch.randperm(n, generator=gen) * (2**32 // max(n, 1)) + torch.randint(0, 5, (n,), generator=gen)
        pos = pos.clamp(max=2**32 - 2).expand(shape).clone()
        pos[..., -1] = PAD_POS
        scores[..., -1] = float("-inf")
        got_s, got_p = packed_topk(scores.to(DEV), pos.to(DEV), k)
        want_s, want_p = ordered_topk(scores, pos, k)
        assert torch.equal(got_p.cpu(), want_p)
        assert torch.equal(got_s.cpu(), want_s)
        us, up = packed_topk(scores.to(DEV), pos.to(DEV), k, sort=False)  # the same set, any order
        assert torch.equal(up.cpu().sort(-1).values, want_p.sort(-1).values)
        if k > n:  # padding carries PAD_POS (not INT64_MIN) and -inf
            assert (got_p[..., n:] == PAD_POS).all() and torch.isneginf(got_s[..., n:]).all()


def test_packed_topk_all_ties_prefers_low_positions() -> None:
    scores = torch.full((2, 40), 1.5)
    pos = torch.stack([torch.randperm(40), torch.arange(40) + 2**31])
    s, p = packed_topk(scores.to(DEV), pos.to(DEV), 8)
    assert torch.equal(p.cpu(), pos.sort(-1).values[:, :8])
    assert (s == 1.5).all()


@st.composite
def distributed_sets(draw):
    """A context of `n` tokens at positions 0..n-1 with tie-heavy scores, a layout to split it, and k."""
    page = draw(st.integers(1, 8))
    interleave = draw(st.sampled_from([i for i in range(1, page + 1) if page % i == 0]))
    d = draw(st.integers(1, 8))
    n = draw(st.one_of(st.integers(0, d), st.integers(0, 60)))
    scores = draw(st.lists(st.integers(0, 3).map(float), min_size=n, max_size=n))
    k = draw(st.integers(1, 20))
    return SlotLayout(page, d, interleave), scores, k


def distributed_topk(lay: SlotLayout, scores: torch.Tensor, positions: torch.Tensor, k: int):
    """The sharded-indexer algorithm in one process: per-rank local top-k, union, top-k of the union."""
    owner = lay.owner_of_position(positions)
    cand_s, cand_p = [], []
    for r in range(lay.dcp):
        mine = owner == r
        s, p = ordered_topk(scores[mine].view(1, -1), positions[mine].view(1, -1), k)
        assert s.shape == (1, k)
        cand_s.append(s)
        cand_p.append(p)
    return ordered_topk(torch.cat(cand_s, -1), torch.cat(cand_p, -1), k)


@SETTINGS
@given(distributed_sets())
def test_distributed_topk_equals_global(args):
    lay, scores, k = args
    n = len(scores)
    s = torch.tensor(scores, dtype=torch.float32)
    p = torch.arange(n, dtype=torch.long)
    gs, gp = ordered_topk(s.view(1, -1), p.view(1, -1), k)
    ds, dp = distributed_topk(lay, s, p, k)
    assert dp.tolist() == gp.tolist()
    assert ds.tolist() == gs.tolist()
    m = min(k, n)
    bs, bp = brute_topk(scores, list(range(n)), k)
    assert gp[0, :m].tolist() == bp[:m]
    assert gs[0].tolist() == bs
    # The first min(k, n) are real positions, the rest padding (test_ordered_topk_k_above_n_pads_with_pad_pos).
    assert all(0 <= x < n for x in gp[0, :m].tolist())
    assert not any(0 <= x < n for x in gp[0, m:].tolist())


@SETTINGS
@given(distributed_sets(), st.data())
def test_distributed_topk_all_on_one_rank(args, data):
    """Every member of the global top-k sits on one rank (its tokens score highest): still exact, and the
    other ranks' candidates are all dropped."""
    lay, scores, k = args
    n = len(scores)
    p = torch.arange(n, dtype=torch.long)
    hot = data.draw(st.integers(0, lay.dcp - 1))
    owner = lay.owner_of_position(p)
    s = torch.tensor(scores, dtype=torch.float32) + 10.0 * (owner == hot).float()
    gs, gp = ordered_topk(s.view(1, -1), p.view(1, -1), k)
    ds, dp = distributed_topk(lay, s, p, k)
    assert dp.tolist() == gp.tolist() and ds.tolist() == gs.tolist()
    owned_hot = int((owner == hot).sum())
    real = gp[0, : min(k, n)]
    assert all(int(lay.owner_of_position(real[j : j + 1])) == hot for j in range(min(k, owned_hot)))


@SETTINGS
@given(distributed_sets(), st.data())
def test_distributed_topk_with_masked_entries_finite_part_exact(args, data):
    """Some real entries are -inf (masked keys): the finite members of the global top-k are still found
    exactly, in order, by the distributed algorithm."""
    lay, scores, k = args
    n = len(scores)
    masked = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    scores = [NEG if m else s for s, m in zip(scores, masked)]
    s = torch.tensor(scores, dtype=torch.float32)
    p = torch.arange(n, dtype=torch.long)
    gs, gp = ordered_topk(s.view(1, -1), p.view(1, -1), k)
    ds, dp = distributed_topk(lay, s, p, k)
    f = int(torch.isfinite(gs).sum())
    assert dp[0, :f].tolist() == gp[0, :f].tolist()
    assert ds.tolist() == gs.tolist()
    _, bp = brute_topk(scores, list(range(n)), k)
    assert gp[0, :f].tolist() == bp[:f]


def test_distributed_topk_with_masked_entries_minimal():
    """d = 2 (page 1, interleave 1), scores [1, -inf, -inf, -inf] at positions 0..3, k = 3. Global top-k
    positions [0, 1, 2]; union of local top-k gives [0, INT64_MIN, INT64_MIN]."""
    lay = SlotLayout(1, 2, 1)
    s = torch.tensor([1.0, NEG, NEG, NEG])
    p = torch.arange(4)
    _, gp = ordered_topk(s.view(1, -1), p.view(1, -1), 3)
    _, dp = distributed_topk(lay, s, p, 3)
    assert gp[0].tolist() == [0, 1, 2]
    assert dp[0].tolist() == [0, 1, 2]


def test_distributed_topk_all_ties_prefers_lower_positions():
    """All scores equal: the global top-k is the k lowest positions for every DCP size and interleave."""
    n, k = 37, 10
    for d in range(1, 9):
        for i in (1, 2, 4):
            lay = SlotLayout(4, d, i)
            s = torch.zeros(n)
            _, dp = distributed_topk(lay, s, torch.arange(n), k)
            assert dp[0].tolist() == list(range(k))


@SETTINGS
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=20),
       st.lists(st.one_of(st.integers(0, MAX_POSITION), st.just(PAD_POS)), min_size=20, max_size=20))
def test_packed_keys_carry_positions_bit_exactly(scores, positions):
    """A decode top-k key carries its position exactly (also above 2^31 and at MAX_POSITION), PAD_POS too."""
    s = torch.tensor(scores, dtype=torch.float32)
    p = torch.tensor(positions[: len(scores)], dtype=torch.long)
    assert key_positions(pack_keys(s, p)).tolist() == p.tolist()


@SETTINGS
@given(score_sets())
def test_topk_keys_selects_the_ordered_topk_set(args):
    """torch.topk over packed keys selects exactly ordered_topk's set (ties by position, -inf entries as
    padding), padded with EMPTY_KEY when k > n."""
    scores, positions, k = args
    s = torch.tensor(scores, dtype=torch.float32).view(1, -1)
    p = torch.tensor(positions, dtype=torch.long).view(1, -1).masked_fill(s == NEG, PAD_POS)
    top = topk_keys(pack_keys(s, p), k)
    assert top.shape == (1, k)
    _, want = ordered_topk(s, p, k)
    assert sorted(key_positions(top)[0].tolist()) == sorted(want[0].tolist())
    assert int((top == EMPTY_KEY).sum()) >= max(0, k - len(scores))


def test_key_order_is_score_then_lower_position():
    keys = pack_keys(torch.tensor([1.0, 2.0, 2.0, -0.0, 0.0, NEG]), torch.tensor([5, 9, 3, 1, 2, 0]))
    order = torch.argsort(keys, descending=True).tolist()
    assert order == [2, 1, 0, 3, 4, 5]  # 2.0@3, 2.0@9, 1.0@5, then -0.0@1 ties +0.0@2 by position, -inf


# -- causal_topk_positions -------------------------------------------------------------------------------------


@st.composite
def causal_cases(draw):
    ctx = draw(st.integers(1, 30))
    new = draw(st.integers(1, ctx))
    k = draw(st.integers(1, 35))
    scores = draw(st.lists(st.integers(-2, 2).map(float), min_size=new * ctx, max_size=new * ctx))
    return ctx, new, k, scores


@SETTINGS
@given(causal_cases())
def test_causal_topk_positions_equals_bruteforce(args):
    ctx, new, k, scores = args
    sc = torch.tensor(scores, dtype=torch.float32).view(new, ctx)
    q_pos = torch.arange(ctx - new, ctx)
    k_pos = torch.arange(ctx)
    top = causal_topk_positions(TorchBackend(), sc, q_pos, k_pos, k)
    assert top.shape == (new, k) and top.dtype == torch.int32
    mask = torch.zeros(new, ctx, dtype=torch.bool)
    for t in range(new):
        sel = top[t][top[t] >= 0].long()
        assert len(set(sel.tolist())) == len(sel)  # no duplicates
        mask[t, sel] = True
    for t in range(new):
        qp = int(q_pos[t])
        cand = list(range(qp + 1))
        _, chosen = brute_topk([scores[t * ctx + j] for j in cand], cand, min(k, qp + 1))
        want = [j in set(chosen) for j in range(ctx)]
        assert mask[t].tolist() == want
        assert int(mask[t].sum()) == min(k, qp + 1)


# -- merge ---------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    n = draw(st.integers(1, 3))  # queries
    h = draw(st.integers(1, 3))  # heads
    dim = draw(st.integers(2, 8))
    v = draw(st.integers(1, dim))
    m = draw(st.integers(0, 24))  # keys
    parts = draw(st.integers(1, 6))
    assign = draw(st.lists(st.integers(0, parts - 1), min_size=m, max_size=m))
    seed = draw(st.integers(0, 2**31 - 1))
    mask_mode = draw(st.sampled_from(["none", "random", "causal"]))
    return n, h, dim, v, m, parts, assign, seed, mask_mode


def make_partials(case, backend=TorchBackend()):
    n, h, dim, v, m, parts, assign, seed, mask_mode = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, dim, generator=g) * 2
    kv = torch.randn(m, dim, generator=g)
    scale = 0.7
    if mask_mode == "none":
        mask = torch.ones(n, m, dtype=torch.bool)
    elif mask_mode == "random":
        mask = torch.rand(n, m, generator=g) < 0.5
    else:  # causal-style: query t sees keys < t*m/n (query 0 sees nothing when m is small)
        mask = torch.arange(m)[None, :] < (torch.arange(n)[:, None] * m) // max(n, 1)
    owner = torch.tensor(assign, dtype=torch.long)
    outs, lses = [], []
    for r in range(parts):
        sel = (owner == r).nonzero().flatten()
        o, l = backend.attend(q, kv[sel], v, scale, mask[:, sel])
        outs.append(o)
        lses.append(l)
    full_o, full_l = backend.attend(q, kv, v, scale, mask)
    return torch.stack(outs), torch.stack(lses), full_o, full_l, (q, kv, v, scale, mask)


@SETTINGS
@given(attention_cases())
def test_merge_of_partials_equals_full_attention(case):
    outs, lses, full_o, full_l, _ = make_partials(case)
    out, lse = merge_partials(outs, lses)
    assert out.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, full_o, rtol=1e-5, atol=1e-5)
    fin = torch.isfinite(full_l)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], full_l[fin], rtol=1e-5, atol=1e-5)
    assert bool((lse[~fin] == NEG).all())
    assert bool((out[~fin] == 0).all())


@SETTINGS
@given(attention_cases())
def test_lse_is_natural_log(case):
    """The backend's LSE (and the merged LSE) is logsumexp_e of the scaled scores, not base 2."""
    outs, lses, full_o, full_l, (q, kv, v, scale, mask) = make_partials(case)
    scores = torch.einsum("nhd,md->nhm", q, kv) * scale
    scores = scores.masked_fill(~mask[:, None, :], NEG)
    ref = torch.logsumexp(scores, dim=-1)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(full_l), fin)
    torch.testing.assert_close(full_l[fin], ref[fin], rtol=1e-5, atol=1e-5)
    _, lse = merge_partials(outs, lses)
    torch.testing.assert_close(lse[fin], ref[fin], rtol=1e-5, atol=1e-5)
    # Output is the softmax (base e) of those scores times the values.
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    ref_o = torch.einsum("nhm,mv->nhv", p, kv[:, :v])
    torch.testing.assert_close(full_o, ref_o, rtol=1e-5, atol=1e-5)


def test_lse_base_is_e_on_a_known_case():
    q = torch.tensor([[[1.0, 0.0]]])
    kv = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    _, lse = TorchBackend().attend(q, kv, 1, 1.0)
    assert lse.item() == pytest.approx(math.log(math.e + 1.0), rel=1e-6)
    # Merge of two single-key partials: L = ln(e^1 + e^0).
    o1, l1 = TorchBackend().attend(q, kv[:1], 1, 1.0)
    o2, l2 = TorchBackend().attend(q, kv[1:], 1, 1.0)
    out, L = merge_partials(torch.stack([o1, o2]), torch.stack([l1, l2]))
    assert L.item() == pytest.approx(math.log(math.e + 1.0), rel=1e-6)
    assert out.item() == pytest.approx(math.e / (math.e + 1.0), rel=1e-6)


@SETTINGS
@given(attention_cases(), st.sampled_from([float("nan"), float("inf"), NEG]), st.data())
def test_broken_lse_is_treated_as_empty(case, bad, data):
    """A shard whose LSE is NaN / +inf / -inf (with a finite garbage output) contributes nothing."""
    outs, lses, _, _, _ = make_partials(case)
    parts = outs.shape[0]
    victim = data.draw(st.integers(0, parts - 1))
    outs2, lses2 = outs.clone(), lses.clone()
    outs2[victim] = 123.0
    lses2[victim] = bad
    keep = [r for r in range(parts) if r != victim]
    want_o, want_l = merge_partials(outs[keep], lses[keep]) if keep else (
        torch.zeros_like(outs[0]), torch.full_like(lses[0], NEG))
    got_o, got_l = merge_partials(outs2, lses2)
    assert not torch.isnan(got_o).any() and not torch.isnan(got_l).any()
    torch.testing.assert_close(got_o, want_o, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.isfinite(got_l), torch.isfinite(want_l))
    fin = torch.isfinite(want_l)
    torch.testing.assert_close(got_l[fin], want_l[fin])
    w, _ = merge_weights(lses2, dim=0)
    assert bool((w[victim] == 0).all())
    assert not torch.isnan(w).any()


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_all_empty_gives_zero_and_minus_inf(parts):
    outs = torch.zeros(parts, 3, 2, 4)
    lses = torch.full((parts, 3, 2), NEG)
    out, lse = merge_partials(outs, lses)
    assert bool((out == 0).all()) and bool((lse == NEG).all())
    # With NaN / +inf LSEs (broken shards) the result is empty too.
    lses2 = lses.clone()
    lses2[0] = float("nan")
    if parts > 1:
        lses2[1] = float("inf")
    out, lse = merge_partials(outs, lses2)
    assert bool((out == 0).all()) and bool((lse == NEG).all())


def test_sanitize_lse():
    x = torch.tensor([1.0, NEG, float("inf"), float("nan"), -3.5])
    assert sanitize_lse(x).tolist() == [1.0, NEG, NEG, NEG, -3.5]


@SETTINGS
@given(attention_cases(), st.sampled_from([float("nan"), float("inf")]), st.data())
def test_empty_shard_with_garbage_output_contributes_nothing(case, garbage, data):
    """An empty shard (lse = -inf) may leave anything in its output buffer, NaN included: the merge must
    ignore it and never produce NaN (DESIGN "Known failure modes")."""
    outs, lses, _, _, _ = make_partials(case)
    parts = outs.shape[0]
    victim = data.draw(st.integers(0, parts - 1))
    outs2, lses2 = outs.clone(), lses.clone()
    outs2[victim] = garbage
    lses2[victim] = NEG
    keep = [r for r in range(parts) if r != victim]
    want_o = merge_partials(outs[keep], lses[keep])[0] if keep else torch.zeros_like(outs[0])
    got_o, _ = merge_partials(outs2, lses2)
    assert not torch.isnan(got_o).any()
    torch.testing.assert_close(got_o, want_o, rtol=1e-6, atol=1e-6)


def test_empty_shard_nan_garbage_minimal():
    """outs [[1, 2]] (lse 0.5) and an empty shard [[nan, nan]] (lse -inf): expected [[1, 2]], got [[nan, nan]]
    (merge.py, `out = (outs.float() * w.unsqueeze(-1)).sum(0)`)."""
    outs = torch.tensor([[[1.0, 2.0]], [[float("nan"), float("nan")]]])  # [2 parts, 1 query, V=2]
    lses = torch.tensor([[0.5], [NEG]])
    out, lse = merge_partials(outs, lses)
    assert lse.tolist() == [0.5]
    assert out.tolist() == [[1.0, 2.0]]
