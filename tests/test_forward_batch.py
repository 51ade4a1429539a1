"""build_forward_batch computes the whole batch's slot math with a few tensor ops; it must equal the
per-sequence layout functions it replaced, for decode and prefill plans, every DCP rank and interleave."""
from __future__ import annotations

import random

import pytest
import torch

from dcpserve.engine.forward_batch import (
    BlockTables,
    SeqPlan,
    StepPlan,
    build_forward_batch,
)
from dcpserve.kv.layout import SlotLayout

DUMMY, INDEX_DUMMY = 999_999, 777_777


def random_plan(layout: SlotLayout, decode: bool, rng: random.Random) -> StepPlan:
    gps = layout.global_page_slots
    seqs = []
    for _ in range(rng.randint(1, 9)):
        start, new = (rng.randint(0, 300), 1) if decode else (rng.randint(0, 120), rng.randint(1, 90))
        seqs.append(SeqPlan(rng.sample(range(5000), -(-(start + new) // gps)), start, new))
    return StepPlan(seqs, [rng.randint(0, 99) for s in seqs for _ in range(s.num_new)], decode)


def per_sequence(plan: StepPlan, layout: SlotLayout, rank: int, replicated: bool):
    pos, rows, index_rows = [], [], []
    for s in plan.seqs:
        p = torch.arange(s.start, s.ctx_len)
        slots = layout.slots_of(torch.tensor(s.block_table), p)
        owned = layout.owner(slots) == rank
        r = torch.where(owned, layout.local_row(slots), torch.full_like(slots, DUMMY))
        pos.append(p), rows.append(r)
        index_rows.append(slots if replicated else torch.where(owned, r, torch.full_like(r, INDEX_DUMMY)))
    return torch.cat(pos), torch.cat(rows), torch.cat(index_rows)


@pytest.mark.parametrize("dcp,interleave", [(1, 1), (2, 1), (4, 2)])
@pytest.mark.parametrize("decode", [True, False])
def test_batched_slot_math_equals_per_sequence(dcp, interleave, decode):
    rng = random.Random(dcp * 10 + interleave + decode)
    layout = SlotLayout(8, dcp, interleave)
    for _ in range(5):
        plan = random_plan(layout, decode, rng)
        for rank in range(dcp):
            for replicated in (False, True):
                fb = build_forward_batch(plan, layout, rank, DUMMY, INDEX_DUMMY, replicated, torch.device("cpu"))
                pos, rows, index_rows = per_sequence(plan, layout, rank, replicated)
                assert torch.equal(fb.positions, pos) and torch.equal(fb.write_rows, rows)
                assert torch.equal(fb.index_write_rows, index_rows)
                assert fb.block_table.dtype == torch.int32 and fb.block_table.shape[0] == len(plan.seqs)
                for i, s in enumerate(plan.seqs):
                    assert fb.block_table[i, : len(s.block_table)].tolist() == s.block_table
                    assert fb.positions[fb.seq_tokens(i)].tolist() == list(range(s.start, s.ctx_len))
                want_lens = [layout.local_count(s.ctx_len if decode else s.start, rank) for s in plan.seqs]
                assert fb.local_lens.tolist() == want_lens


def test_empty_plan():
    fb = build_forward_batch(StepPlan([], [], True), SlotLayout(8, 2), 0, DUMMY, INDEX_DUMMY, False, torch.device("cpu"))
    assert fb.positions.numel() == 0 and fb.block_table.shape == (0, 1) and fb.max_ctx_len == 0


@pytest.mark.parametrize("decode", [True, False])
def test_block_table_deltas_equal_whole_tables(decode):
    """Plans that carry only each sequence's new pages (rows of the ranks' BlockTables: sequences grow, end,
    and their slots are reused by shorter ones, leaving stale entries behind) build the same batch on every
    rank as plans carrying whole tables."""
    rng = random.Random(5 + decode)
    layout = SlotLayout(4, 2, 1)
    gps = layout.global_page_slots
    ranks = [BlockTables() for _ in range(layout.dcp)]
    live: dict[int, dict] = {}  # slot -> {"table": pages, "sent": entries the ranks hold, "ctx": tokens}
    used, grown, reused = set(), 0, 0
    for step in range(40):
        for slot in [k for k in live if rng.random() < 0.15]:  # sequences end; their slots free up
            del live[slot]
        free = [k for k in range(10) if k not in live]
        for slot in rng.sample(free, min(len(free), rng.randint(0, 2))):
            live[slot] = {"table": [], "sent": 0, "ctx": rng.randint(0, 40)}  # a new sequence, re-sent from 0
            reused += slot in used
            used.add(slot)
        if not live:
            continue
        whole, deltas = [], []
        for slot in rng.sample(sorted(live), rng.randint(1, len(live))):
            q = live[slot]
            start, new = q["ctx"], 1 if decode else rng.randint(1, 30)
            need = -(-(start + new) // gps) - len(q["table"])
            q["table"] += rng.sample(range(5000), max(need, 0))
            whole.append(SeqPlan(list(q["table"]), start, new))
            deltas.append(SeqPlan(q["table"][q["sent"]:], start, new, slot=slot, table_from=q["sent"]))
            q["sent"], q["ctx"] = len(q["table"]), start + new
        ids = [rng.randint(0, 99) for p in whole for _ in range(p.num_new)]
        for rank, tables in enumerate(ranks):
            want = build_forward_batch(StepPlan(whole, ids, decode), layout, rank, DUMMY, INDEX_DUMMY, False,
                                       torch.device("cpu"))
            got = build_forward_batch(StepPlan(deltas, ids, decode), layout, rank, DUMMY, INDEX_DUMMY, False,
                                      torch.device("cpu"), tables=tables)
            for name in ("positions", "write_rows", "index_write_rows", "block_table", "ctx_lens", "local_lens",
                         "last_idx"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, rank, name)
            assert all(torch.equal(a, b) for a, b in zip(got.own_rows, want.own_rows))
            assert all(torch.equal(a, b) for a, b in zip(got.prefix_dest, want.prefix_dest))
        grown += sum(p.table_from > 0 and len(p.block_table) > 0 for p in deltas)
    assert grown > 0 and reused > 0  # both kinds of delta were exercised


def test_delta_plan_needs_tables():
    plan = StepPlan([SeqPlan([3], 0, 1, slot=0)], [1], True)
    with pytest.raises(ValueError, match="BlockTables"):
        build_forward_batch(plan, SlotLayout(4, 1), 0, DUMMY, INDEX_DUMMY, False, torch.device("cpu"))
