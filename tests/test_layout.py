"""Property tests of the DCP slot layout (DESIGN section 2, step 1) and of the per-step metadata built from it
(forward_batch.py): ownership, local rows, counts, and "-1 padding is never read as a row"."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcpserve.engine.forward_batch import SeqPlan, StepPlan, build_forward_batch
from dcpserve.kv.layout import SlotLayout

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layouts(draw, max_page=16):
    page_size = draw(st.integers(1, max_page))
    dcp = draw(st.integers(1, 8))
    divisors = [i for i in range(1, page_size + 1) if page_size % i == 0]
    interleave = draw(st.sampled_from(divisors))
    return SlotLayout(page_size, dcp, interleave)


@st.composite
def layout_and_seq(draw):
    """A layout, a pool of `num_pages` global pages, one sequence's block table (distinct pages) and a length
    that fits it (including 0 and fewer than dcp tokens)."""
    lay = draw(layouts())
    num_pages = draw(st.integers(1, 12))
    n_bt = draw(st.integers(0, num_pages))
    bt = draw(st.permutations(list(range(num_pages))))[:n_bt]
    cap = n_bt * lay.global_page_slots
    length = draw(st.one_of(st.integers(0, min(cap, lay.dcp)), st.integers(0, cap)))
    return lay, num_pages, bt, length


# -- ownership and local rows ----------------------------------------------------------------------------


@SETTINGS
@given(layouts(), st.integers(1, 6))
def test_every_slot_has_one_owner_and_pages_map_to_local_page_rows(lay, num_pages):
    """Over the whole global slot space: one owner per slot, in [0, d); for each rank, (slot -> local row) is a
    bijection from its owned slots of global page g onto rows [g*page_size, (g+1)*page_size)."""
    p, d = lay.page_size, lay.dcp
    slots = torch.arange(num_pages * lay.global_page_slots)
    owner = lay.owner(slots)
    rows = lay.local_row(slots)
    assert owner.shape == slots.shape
    assert bool(((owner >= 0) & (owner < d)).all())
    for g in range(num_pages):
        page_slots = slots[g * p * d : (g + 1) * p * d]
        for r in range(d):
            mine = page_slots[owner[page_slots] == r]
            assert mine.numel() == p, "each rank owns exactly page_size slots of every global page"
            got = sorted(rows[mine].tolist())
            assert got == list(range(g * p, (g + 1) * p))
    # Global bijection: (owner, local_row) pairs are pairwise distinct.
    pairs = set(zip(owner.tolist(), rows.tolist()))
    assert len(pairs) == slots.numel()


@SETTINGS
@given(layouts())
def test_owner_matches_definition(lay):
    s = torch.arange(4 * lay.global_page_slots + 3)
    i, d = lay.interleave, lay.dcp
    assert lay.owner(s).tolist() == [(x // i) % d for x in s.tolist()]
    assert lay.local_row(s).tolist() == [(x // (i * d)) * i + x % i for x in s.tolist()]


@SETTINGS
@given(layout_and_seq())
def test_sequence_slots_owner_and_bijection(args):
    """For one sequence: slots_of follows the page math, its owners depend on the position alone, and
    (owner, local row) is a bijection from its tokens onto distinct rows inside its pages' row ranges."""
    lay, _, bt, length = args
    p, d, gps = lay.page_size, lay.dcp, lay.global_page_slots
    pos = torch.arange(length, dtype=torch.long)
    btt = torch.tensor(bt, dtype=torch.long)
    slots = lay.slots_of(btt, pos) if length else torch.empty(0, dtype=torch.long)
    assert slots.tolist() == [bt[x // gps] * gps + x % gps for x in range(length)]
    assert len(set(slots.tolist())) == length
    own = lay.owner(slots)
    assert own.tolist() == lay.owner_of_position(pos).tolist()
    rows = lay.local_row(slots)
    if length:
        assert rows.tolist() == lay.local_rows_of_positions(btt, pos).tolist()
    seen = set()
    for x, o, r in zip(range(length), own.tolist(), rows.tolist()):
        g = bt[x // gps]
        assert g * p <= r < (g + 1) * p, "a token's local row lies inside its global page's row range"
        assert (o, r) not in seen
        seen.add((o, r))
    if length == len(bt) * gps:  # full pages: each rank's rows are exactly its pages' row ranges
        for r in range(d):
            want = sorted(row for g in bt for row in range(g * p, (g + 1) * p))
            assert sorted(rw for (o, rw) in seen if o == r) == want


@SETTINGS
@given(layouts(), st.integers(0, 300))
def test_local_count_and_positions(lay, length):
    d, i = lay.dcp, lay.interleave
    pos = torch.arange(length, dtype=torch.long)
    owners = lay.owner_of_position(pos).tolist()
    counts = []
    for r in range(d):
        c = lay.local_count(length, r)
        assert c == sum(1 for o in owners if o == r)
        lp = lay.local_positions(length, r)
        assert lp.dtype == torch.long
        assert lp.numel() == c
        assert lp.tolist() == sorted(lp.tolist()) and len(set(lp.tolist())) == c
        assert all(owners[x] == r for x in lp.tolist())
        counts.append(c)
    assert sum(counts) == length
    assert max(counts) - min(counts) <= i
    # ceil / floor of the interleave blocks: every rank holds floor(len/(i*d))*i plus 0..i of the remainder.
    base = (length // (i * d)) * i
    assert all(base <= c <= base + i for c in counts)
    if i == 1:
        assert sorted(set(counts)) in ([length // d], [length // d, -(-length // d)])
    # The union of the per-rank positions is every position exactly once.
    allpos = sorted(x for r in range(d) for x in lay.local_positions(length, r).tolist())
    assert allpos == list(range(length))


@SETTINGS
@given(layouts(), st.integers(0, 40))
def test_local_count_below_dcp(lay, length):
    """Fewer tokens than ranks: ranks beyond the data own nothing, and the count is never negative."""
    length = min(length, lay.dcp - 1) if lay.dcp > 1 else 0
    for r in range(lay.dcp):
        c = lay.local_count(length, r)
        assert c >= 0
        assert c == lay.local_positions(length, r).numel()


@SETTINGS
@given(layout_and_seq())
def test_dcp1_degenerates_to_plain_paging(args):
    lay, _, bt, length = args
    plain = SlotLayout(lay.page_size, 1, lay.interleave)
    pos = torch.arange(length, dtype=torch.long)
    btt = torch.tensor(bt, dtype=torch.long)
    s = torch.arange(3 * plain.page_size * 4)
    assert plain.global_page_slots == plain.page_size
    assert bool((plain.owner(s) == 0).all())
    assert plain.local_row(s).tolist() == s.tolist()
    assert plain.local_count(length, 0) == length
    assert plain.local_positions(length, 0).tolist() == list(range(length))
    if length <= len(bt) * plain.page_size and length:
        rows = plain.local_rows_of_positions(btt, pos)
        assert rows.tolist() == [bt[x // plain.page_size] * plain.page_size + x % plain.page_size for x in range(length)]


@SETTINGS
@given(layouts(), st.integers(0, 500))
def test_pages_needed(lay, length):
    n = lay.pages_needed(length)
    assert n * lay.global_page_slots >= length
    assert n == 0 or (n - 1) * lay.global_page_slots < length


# -- "-1 padding never read as a row" ------------------------------------------------------------------


def test_minus_one_reads_the_last_row_in_torch():
    """Why the engine needs a reserved dummy row instead of -1 padding: torch reads index -1 as the last row,
    and -1 % d == d - 1 names a real rank."""
    cache = torch.arange(10).view(5, 2)
    assert cache[torch.tensor([-1])].tolist() == [[8, 9]]
    for d in range(1, 9):
        assert (-1) % d == d - 1
        assert int(torch.tensor(-1) % d) == d - 1
    lay = SlotLayout(4, 4)
    assert int(lay.owner(torch.tensor([-1]))) == 3  # a -1 slot would be "owned" by rank 3 ...
    assert int(lay.local_row(torch.tensor([-1]))) == -1  # ... at row -1, i.e. the last row of its pool


@st.composite
def step_plans(draw):
    lay = draw(layouts(max_page=8))
    num_pages = draw(st.integers(1, 16))
    perm = draw(st.permutations(list(range(num_pages))))
    is_decode = draw(st.booleans())
    nseq = draw(st.integers(1, 4))
    seqs, ids, used = [], [], 0
    for _ in range(nseq):
        n_bt = draw(st.integers(0, num_pages - used))
        bt = perm[used : used + n_bt]
        used += n_bt
        cap = n_bt * lay.global_page_slots
        if cap == 0:
            continue
        ctx = draw(st.one_of(st.integers(1, min(cap, lay.dcp + 1)), st.integers(1, cap)))
        if is_decode:
            start, new = ctx - 1, 1
        else:
            new = draw(st.integers(1, ctx))
            start = ctx - new
        seqs.append(SeqPlan(list(bt), start, new))
        ids += [7] * new
    return lay, num_pages, StepPlan(seqs, ids, is_decode), draw(st.booleans())


@SETTINGS
@given(step_plans())
def test_forward_batch_metadata_never_negative_and_dummy_for_foreign_tokens(args):
    """build_forward_batch for random plans: write rows in [0, rows] (rows = the dummy row), owned rows in
    [0, rows), tokens owned elsewhere go to the dummy row (never -1), and the indexer rows likewise."""
    lay, num_pages, plan, replicated = args
    rows = num_pages * lay.page_size
    dummy = rows
    index_rows = rows * (lay.dcp if replicated else 1)
    for r in range(lay.dcp):
        fb = build_forward_batch(plan, lay, r, dummy, index_rows, replicated, torch.device("cpu"))
        t = sum(s.num_new for s in plan.seqs)
        assert fb.write_rows.shape == (t,) and fb.index_write_rows.shape == (t,)
        assert fb.positions.shape == (t,)
        assert bool(((fb.write_rows >= 0) & (fb.write_rows <= dummy)).all())
        assert bool(((fb.index_write_rows >= 0) & (fb.index_write_rows <= index_rows)).all())
        owned_written = []
        for i, s in enumerate(plan.seqs):
            sl = fb.seq_tokens(i)
            pos = fb.positions[sl]
            assert pos.tolist() == list(range(s.start, s.ctx_len))
            bt = torch.tensor(s.block_table)
            owner = lay.owner_of_position(pos)
            wr = fb.write_rows[sl]
            mine = owner == r
            assert bool((wr[~mine] == dummy).all())
            assert bool((wr[mine] < rows).all())
            assert wr[mine].tolist() == lay.local_rows_of_positions(bt, pos[mine]).tolist()
            owned_written += wr[mine].tolist()
            iw = fb.index_write_rows[sl]
            if replicated:
                assert iw.tolist() == lay.slots_of(bt, pos).tolist()
                assert bool((iw < index_rows).all())
            else:
                assert iw.tolist() == wr.masked_fill(~mine, index_rows).tolist()
            limit = s.ctx_len if plan.is_decode else s.start
            orow, opos = owned_rows_and_pos(fb, lay, r, i)
            assert int(fb.local_lens[i]) == lay.local_count(limit, r)
            assert opos.tolist() == lay.local_positions(limit, r).tolist()
            assert orow.dtype == torch.long
            assert bool(((orow >= 0) & (orow < rows)).all())
            assert orow.tolist() == lay.local_rows_of_positions(bt, opos).tolist()
            assert fb.last_idx[i].item() == fb.cu_new[i + 1] - 1
        assert len(owned_written) == len(set(owned_written)), "two tokens written to one real row"


def owned_rows_and_pos(fb, lay, r, i):
    """The rows (and positions) rank r reads for sequence i: decode reads its whole context through the block
    table (the paged kernels' view), prefill the cached prefix rows it sends to the gather."""
    if not fb.is_decode:
        return fb.own_rows[i], lay.local_positions(fb.seqs[i].start, r)
    from dcpserve.attention.backend import paged_rows
    from dcpserve.attention.topk import PAD_POS

    n = int(fb.local_lens[i])
    rows, valid = paged_rows(fb.block_table[i : i + 1], fb.local_lens[i : i + 1], lay.page_size, n)
    assert bool(valid.all())
    pos = lay.local_position_table(r, fb.local_lens[i : i + 1], n, PAD_POS)[0]
    return rows[0], pos


@SETTINGS
@given(step_plans())
def test_simulated_pools_roundtrip(args):
    """Simulate every rank's latent pool (rows + 1 rows, the last one the dummy): write each token's global
    position at its write row on every rank, then read own_rows: each rank reads back exactly its owned positions, nobody
    ever reads the dummy row, and together the ranks hold every position of every context exactly once."""
    lay, num_pages, plan, _ = args
    rows = num_pages * lay.page_size
    d = lay.dcp
    # Prefill plans read only the cached prefix; make the "cache" hold the prefix by writing it first.
    pools = [torch.full((rows + 1,), -7, dtype=torch.long) for _ in range(d)]
    prefix = StepPlan([SeqPlan(s.block_table, 0, s.start) for s in plan.seqs if s.start > 0],
                      [], False)
    for step in (prefix, plan):
        for r in range(d):
            fb = build_forward_batch(step, lay, r, rows, rows, False, torch.device("cpu"))
            pools[r][fb.write_rows] = fb.positions
    for r in range(d):
        fb = build_forward_batch(plan, lay, r, rows, rows, False, torch.device("cpu"))
        for i, s in enumerate(plan.seqs):
            orow, opos = owned_rows_and_pos(fb, lay, r, i)
            assert pools[r][orow].tolist() == opos.tolist()
    for i, s in enumerate(plan.seqs):
        limit = s.ctx_len if plan.is_decode else s.start
        allpos = []
        for r in range(d):
            fb = build_forward_batch(plan, lay, r, rows, rows, False, torch.device("cpu"))
            allpos += pools[r][owned_rows_and_pos(fb, lay, r, i)[0]].tolist()
        assert sorted(allpos) == list(range(limit))
