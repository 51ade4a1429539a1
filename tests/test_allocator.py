"""Property tests of the global page allocator (refcounts, prefix cache) and of the scheduler under a tiny
pool: no deadlock, chunk budget respected, preemption frees pages, no KV leak at the end."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dcpserve.engine.forward_batch import BlockTables
from dcpserve.engine.sampler import SamplingParams
from dcpserve.engine.scheduler import Scheduler, Sequence, Status
from dcpserve.kv.allocator import PageAllocator

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_allocator(a: PageAllocator, held: dict[int, int] | None = None) -> None:
    """Structural invariants. `held`: the expected refcount of each page from the caller's own bookkeeping."""
    n = a.num_pages
    assert all(c >= 0 for c in a.refcount), "negative refcount"
    free = list(a.free)
    assert len(free) == len(set(free)), "page twice in the free list"
    evict = list(a.evictable)
    used = [p for p in range(n) if a.refcount[p] > 0]
    assert set(free).isdisjoint(evict)
    assert set(free).isdisjoint(used) and set(evict).isdisjoint(used)
    assert sorted(free + evict + used) == list(range(n)), "every page is exactly one of free/evictable/used"
    assert a.num_free + a.num_used == n
    assert a.num_free == len(free) + len(evict)
    assert all(p in a.hash_of for p in evict), "an evictable page must be a cached page"
    assert all(p not in a.hash_of for p in free), "a free page must not be findable in the cache"
    assert {a.page_of[h]: h for h in a.page_of} == a.hash_of, "page_of and hash_of disagree"
    if held is not None:
        assert [held.get(p, 0) for p in range(n)] == a.refcount


# -- allocator: stateful ------------------------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / release / match / register sequences. A model tracks, per owner ("sequence"), the
    pages it holds and the tokens they contain, and, per registered hash, the exact token prefix, so a
    match can be checked against content rather than against hashes."""

    PAGE_TOKENS = 2

    def __init__(self):
        super().__init__()
        self.a = PageAllocator(num_pages=6, page_tokens=self.PAGE_TOKENS)
        self.owners: list[dict] = []  # {"pages": [...], "tokens": [...], "hashes": [...]}
        self.content: dict[int, tuple[int, ...]] = {}  # page -> full token prefix it holds (cached pages)

    def held(self) -> dict[int, int]:
        h: dict[int, int] = {}
        for o in self.owners:
            for p in o["pages"]:
                h[p] = h.get(p, 0) + 1
        return h

    @rule(n=st.integers(0, 4), toks=st.lists(st.integers(0, 2), min_size=8, max_size=8))
    def allocate(self, n, toks):
        if not self.a.can_allocate(n):
            with pytest.raises(MemoryError):
                self.a.allocate(n)
            return
        busy = {p for o in self.owners for p in o["pages"]}
        pages = self.a.allocate(n)
        assert len(pages) == len(set(pages)) == n
        assert busy.isdisjoint(pages), "allocated a page that is in use"
        for p in pages:
            self.content.pop(p, None)  # evicted or fresh: old content is gone
            assert p not in self.a.hash_of
        self.owners.append({"pages": pages, "tokens": toks[: n * self.PAGE_TOKENS], "hashes": []})

    @rule(data=st.data())
    @precondition(lambda self: self.owners)
    def release(self, data):
        o = self.owners.pop(data.draw(st.integers(0, len(self.owners) - 1)))
        self.a.release(o["pages"])

    @rule(data=st.data())
    @precondition(lambda self: self.owners)
    def register(self, data):
        """The owner's next page is now full: register it (as the scheduler does)."""
        o = self.owners[data.draw(st.integers(0, len(self.owners) - 1))]
        i = len(o["hashes"])
        if i >= len(o["pages"]):
            return
        n = self.PAGE_TOKENS
        page = o["pages"][i]
        prev = o["hashes"][-1] if o["hashes"] else None
        was_cached = page in self.a.hash_of
        h = self.a.register(page, prev, tuple(o["tokens"][i * n : (i + 1) * n]))
        o["hashes"].append(h)
        if not was_cached and self.a.hash_of.get(page) == h:
            self.content[page] = tuple(o["tokens"][: (i + 1) * n])

    @rule(toks=st.lists(st.integers(0, 2), min_size=0, max_size=10), max_tokens=st.integers(0, 10))
    def match(self, toks, max_tokens):
        n = self.PAGE_TOKENS
        before = list(self.a.refcount)
        pages, hashes = self.a.match_prefix(toks, max_tokens)
        assert len(pages) == len(hashes) <= max_tokens // n
        assert len(pages) * n <= len(toks)
        assert len(set(pages)) == len(pages)
        for i, p in enumerate(pages):
            assert self.content.get(p) == tuple(toks[: (i + 1) * n]), "matched a page whose tokens differ"
            assert self.a.refcount[p] == before[p] + 1
        # Maximal: the next page is not a content match that the cache still holds.
        j = len(pages)
        if (j + 1) * n <= min(max_tokens, len(toks)):
            want = tuple(toks[: (j + 1) * n])
            holders = [p for p, c in self.content.items() if c == want and p in self.a.hash_of]
            assert not holders, f"cached page {holders} with matching content not returned"
        self.owners.append({"pages": pages, "tokens": list(toks[: j * n]), "hashes": list(hashes)})

    @invariant()
    def consistent(self):
        check_allocator(self.a, self.held())
        for p in list(self.content):
            if p not in self.a.hash_of:
                del self.content[p]

    def teardown(self):
        for o in self.owners:
            self.a.release(o["pages"])
        check_allocator(self.a, {})
        assert self.a.num_free == self.a.num_pages


TestAllocatorStateful = AllocatorMachine.TestCase
TestAllocatorStateful.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_release_twice_is_caught():
    a = PageAllocator(4, 2)
    p = a.allocate(1)
    a.release(p)
    with pytest.raises(AssertionError):
        a.release(p)


def test_eviction_drops_stale_cache_entry():
    """A cached page reused for other tokens must no longer match its old content."""
    a = PageAllocator(2, 2)
    p = a.allocate(1)
    a.register(p[0], None, (1, 2))
    a.release(p)
    assert a.match_prefix([1, 2, 3], 2)[0] == p  # hit while cached
    a.release(p)
    q = a.allocate(2)  # evicts it
    assert sorted(q) == [0, 1]
    assert a.match_prefix([1, 2, 3], 2) == ([], [])
    a.release(q)
    check_allocator(a, {})


def test_disabled_prefix_cache_never_matches():
    a = PageAllocator(3, 2, enable_prefix_cache=False)
    p = a.allocate(1)
    a.register(p[0], None, (1, 2))
    a.release(p)
    assert a.match_prefix([1, 2, 3, 4], 4) == ([], [])
    check_allocator(a, {})
    assert a.num_free == 3


# -- scheduler: tiny pool, fake model ------------------------------------------------------------------------


class CheckedScheduler(Scheduler):
    """Checks every preemption as it happens: the victim's pages go back at once."""

    preemptions = 0

    def preempt(self, seq):
        pages = list(seq.block_table)
        before = [self.alloc.refcount[p] for p in pages]
        super().preempt(seq)
        assert seq.block_table == [] and seq.num_computed == 0 and seq.page_hashes == []
        assert seq.status == Status.WAITING and self.waiting[0] is seq and seq not in self.running
        assert [self.alloc.refcount[p] for p in pages] == [c - 1 for c in before]
        self.preemptions += 1


def check_scheduler_refs(s: Scheduler, seqs: list[Sequence]) -> None:
    """Every reference the allocator counts belongs to exactly one block-table entry of a live sequence."""
    held: dict[int, int] = {}
    for q in seqs:
        if q.status == Status.FINISHED:
            assert q.block_table == []
        assert len(q.block_table) == len(set(q.block_table)), "page twice in one block table"
        for p in q.block_table:
            held[p] = held.get(p, 0) + 1
    check_allocator(s.alloc, held)


def run_scheduler(num_pages, page_tokens, max_running, chunk, reqs, seed, prefix_cache=True, abort_p=0.0,
                  arrivals=None, max_steps=20000):
    """Drive the scheduler like LLMEngine.step does, with a fake model that returns arbitrary tokens.
    `reqs`: list of (prompt, max_tokens). Returns (sequences, step count, preemptions seen)."""
    rng = random.Random(seed)
    alloc = PageAllocator(num_pages, page_tokens, prefix_cache)
    s = CheckedScheduler(alloc, max_running, chunk)
    seqs = [Sequence(f"r{i}", list(p), SamplingParams(max_tokens=m, ignore_eos=True)) for i, (p, m) in enumerate(reqs)]
    arrivals = arrivals or [0] * len(seqs)
    pending = sorted(range(len(seqs)), key=lambda i: arrivals[i])
    steps = preempt_seen = 0
    tables = BlockTables()  # a rank's copy, fed only the plans' deltas
    while pending or s.has_work():
        while pending and arrivals[pending[0]] <= steps:
            s.add(seqs[pending.pop(0)])
        steps += 1
        assert steps < max_steps, "no progress: livelock"
        if abort_p and rng.random() < abort_p:
            live = [q for q in seqs if q.status != Status.FINISHED and q in (list(s.waiting) + s.running)]
            if live:
                s.finish(rng.choice(live), "abort")
                check_scheduler_refs(s, seqs)
        step = s.schedule()
        if step is None:
            assert not s.has_work(), (f"deadlock: nothing scheduled with {len(s.waiting)} waiting, "
                                      f"{len(s.running)} running, {alloc.num_free}/{num_pages} pages free")
            continue
        plan = step.plan
        assert len(plan.seqs) == len(step.seqs) == len(step.samples) >= 1
        n_new = sum(p.num_new for p in plan.seqs)
        assert len(plan.input_ids) == n_new
        if plan.is_decode:
            assert all(p.num_new == 1 for p in plan.seqs)
            assert all(q.status == Status.RUNNING for q in step.seqs)
        else:
            assert n_new <= chunk, f"prefill step of {n_new} tokens exceeds the chunk budget {chunk}"
            assert all(p.num_new >= 1 for p in plan.seqs)
        assert len(s.running) <= max_running
        assert len({id(q) for q in step.seqs}) == len(step.seqs), "a sequence twice in one step"
        # What the ranks hold after this plan's deltas is each sequence's whole table.
        tables.apply(plan.seqs)
        held = tables.rows(plan.seqs, max(p.num_pages for p in plan.seqs)).tolist()
        assert len({p.slot for p in plan.seqs}) == len(plan.seqs), "two sequences of a step share a slot"
        for q, p, row in zip(step.seqs, plan.seqs, held):
            assert p.num_pages == len(q.block_table) and row[: p.num_pages] == q.block_table
            assert p.ctx_len <= p.num_pages * page_tokens, "step writes past the sequence's pages"
            assert p.start == q.num_computed
            assert plan.input_ids is not None
        # Input tokens are the sequence's own tokens at those positions.
        off = 0
        for q, p in zip(step.seqs, plan.seqs):
            assert plan.input_ids[off : off + p.num_new] == q.tokens[p.start : p.ctx_len]
            off += p.num_new
        check_scheduler_refs(s, seqs)
        tokens = [rng.randrange(0, 4) if spec is not None else None for spec in step.samples]
        s.complete(step, tokens)
        for q, tok in zip(step.seqs, tokens):
            if tok is None or q.status == Status.FINISHED:
                continue
            if len(q.output_ids) >= q.params.max_tokens:
                s.finish(q, "length")
        check_scheduler_refs(s, seqs)
        preempt_seen = sum(q.num_preemptions for q in seqs)
    return seqs, alloc, steps, preempt_seen


@st.composite
def workloads(draw):
    page_tokens = draw(st.integers(1, 4))
    num_pages = draw(st.integers(2, 8))
    cap = num_pages * page_tokens
    max_running = draw(st.integers(1, 4))
    chunk = draw(st.integers(1, 12))
    nreq = draw(st.integers(1, 6))
    reqs = []
    shared = draw(st.lists(st.integers(0, 2), min_size=0, max_size=cap))  # common prefix for cache hits
    for _ in range(nreq):
        plen = draw(st.integers(1, cap))
        use_shared = draw(st.booleans())
        prompt = (shared + draw(st.lists(st.integers(0, 2), min_size=plen, max_size=plen)))[:plen] if use_shared \
            else draw(st.lists(st.integers(0, 3), min_size=plen, max_size=plen))
        max_tokens = draw(st.integers(1, cap - plen + 1))  # the engine's admission rule: prompt + max <= cap
        if plen + max_tokens > cap:
            max_tokens = cap - plen
        if max_tokens < 1:
            continue
        reqs.append((prompt, max_tokens))
    arrivals = draw(st.lists(st.integers(0, 6), min_size=len(reqs), max_size=len(reqs)))
    return dict(num_pages=num_pages, page_tokens=page_tokens, max_running=max_running, chunk=chunk, reqs=reqs,
                seed=draw(st.integers(0, 1000)), prefix_cache=draw(st.booleans()), arrivals=arrivals)


@SETTINGS
@given(workloads())
def test_scheduler_tiny_pool_always_finishes_without_leak(w):
    seqs, alloc, _, _ = run_scheduler(**w)
    for q in seqs:
        assert q.status == Status.FINISHED and q.finish_reason == "length"
        assert len(q.output_ids) == q.params.max_tokens
        assert q.block_table == []
    check_allocator(alloc, {})
    assert alloc.num_free == alloc.num_pages, "KV pages leaked"


@SETTINGS
@given(workloads(), st.floats(0.05, 0.3))
def test_scheduler_with_aborts_frees_everything(w, abort_p):
    seqs, alloc, _, _ = run_scheduler(**w, abort_p=abort_p)
    assert all(q.status == Status.FINISHED for q in seqs)
    check_allocator(alloc, {})
    assert alloc.num_free == alloc.num_pages


def test_preemption_happens_and_frees_pages():
    """Two requests in a pool that holds one at a time (prompt 3 + 5 new tokens, 4 pages of 2): at least one
    preemption, every preemption returns the victim's pages, both finish, nothing leaks."""
    alloc = PageAllocator(4, 2)
    s = CheckedScheduler(alloc, max_running=2, chunk_tokens=8)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    b = Sequence("b", [3, 2, 1], SamplingParams(max_tokens=5, ignore_eos=True))
    s.add(a)
    s.add(b)
    for _ in range(500):
        if not s.has_work():
            break
        step = s.schedule()
        assert step is not None, "deadlock"
        toks = [7 if sp is not None else None for sp in step.samples]
        s.complete(step, toks)
        for q, t in zip(step.seqs, toks):
            if t is not None and q.status != Status.FINISHED and len(q.output_ids) >= q.params.max_tokens:
                s.finish(q, "length")
        check_scheduler_refs(s, [a, b])
    assert a.status == b.status == Status.FINISHED
    assert len(a.output_ids) == len(b.output_ids) == 5
    assert s.preemptions >= 1 and a.num_preemptions + b.num_preemptions == s.preemptions
    assert getattr(s, "num_preemptions", s.preemptions) == s.preemptions
    assert alloc.num_free == alloc.num_pages


def test_preempt_releases_pages_immediately():
    alloc = PageAllocator(8, 2)
    s = Scheduler(alloc, max_running=4, chunk_tokens=16)
    q = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True))
    s.add(q)
    step = s.schedule()
    s.complete(step, [9])
    assert q.status == Status.RUNNING and len(q.block_table) == 3
    used = alloc.num_used
    s.preempt(q)
    assert q.block_table == [] and q.num_computed == 0 and q.status == Status.WAITING
    assert alloc.num_used == used - 3 == 0
    assert s.waiting[0] is q
    check_scheduler_refs(s, [q])


def test_chunked_prefill_respects_budget_across_page_boundaries():
    alloc = PageAllocator(32, 4)
    s = Scheduler(alloc, max_running=8, chunk_tokens=5)
    seqs = [Sequence(f"r{i}", list(range(i, i + 13)), SamplingParams(max_tokens=2, ignore_eos=True)) for i in range(3)]
    for q in seqs:
        s.add(q)
    while s.has_work():
        step = s.schedule()
        assert step is not None
        if not step.plan.is_decode:
            assert sum(p.num_new for p in step.plan.seqs) <= 5
        toks = [1 if sp is not None else None for sp in step.samples]
        s.complete(step, toks)
        for q, t in zip(step.seqs, toks):
            if t is not None and len(q.output_ids) >= 2:
                s.finish(q, "length")
    assert alloc.num_free == alloc.num_pages


def test_prefix_cache_hit_reuses_pages_with_same_tokens():
    alloc = PageAllocator(16, 2)
    s = Scheduler(alloc, max_running=4, chunk_tokens=64)
    a = Sequence("a", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=1, ignore_eos=True))
    s.add(a)
    step = s.schedule()
    s.complete(step, [0])
    a_pages = list(a.block_table)
    s.finish(a, "length")
    b = Sequence("b", [1, 2, 3, 4, 9, 9, 9], SamplingParams(max_tokens=1, ignore_eos=True))
    s.add(b)
    step = s.schedule()
    assert b.cached_tokens == 4 and b.block_table[:2] == a_pages[:2]
    assert step.plan.seqs[0].start == 4 and step.plan.input_ids == [9, 9, 9]
    s.complete(step, [0])
    s.finish(b, "length")
    assert alloc.num_free == alloc.num_pages


@SETTINGS
@given(st.lists(st.integers(0, 9), max_size=12), st.lists(st.integers(0, 9), max_size=12), st.integers(0, 30),
       st.integers(0, 30))
def test_token_slice_equals_slicing_the_tokens(prompt, output, a, b):
    q = Sequence("r", prompt, SamplingParams())
    q.output_ids = output
    assert q.token_slice(a, b) == q.tokens[a:b]
