"""Continuous-batching scheduler (FCFS) with chunked prefill, prefix caching and preemption by recompute.

Each step is either a prefill step (chunks of waiting prompts, up to `chunked_prefill_size` tokens) or a
decode step (one token for every running sequence). When the pool runs dry during decode, the most recently
admitted sequence is preempted: its pages are released and it re-enters the queue front, to be recomputed
from its prompt plus the tokens it already produced. Nothing ever fails for lack of KV unless a single
request can never fit.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from dcpserve.engine.forward_batch import SeqPlan, StepPlan
from dcpserve.engine.sampler import SampleSpec, SamplingParams
from dcpserve.kv.allocator import PageAllocator


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's `in` / `remove` over its lists must not compare token lists
class Sequence:
    req_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    page_hashes: list[int] = field(default_factory=list)  # hashes of the leading full pages registered so far
    num_computed: int = 0  # tokens whose KV is in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    cached_tokens: int = 0  # prefix-cache hit on first admission
    # The ranks' BlockTables row holding this sequence's pages (None: not assigned), and how many entries of
    # block_table the plans sent so far have put there.
    slot: int | None = None
    sent_pages: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, a: int, b: int) -> list[int]:
        """tokens[a:b] without building the whole list (a page's worth, at every page a long sequence fills)."""
        p = len(self.prompt_ids)
        head = self.prompt_ids[a:b] if a < p else []
        return head + self.output_ids[max(a - p, 0) : max(b - p, 0)]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def sample_spec(self) -> SampleSpec:
        p = self.params
        return SampleSpec(self.req_id, p.temperature, p.top_p, p.top_k, p.seed, len(self.output_ids))


@dataclass
class ScheduledStep:
    plan: StepPlan
    seqs: list[Sequence]
    samples: list[SampleSpec | None]


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_running: int, chunk_tokens: int):
        self.alloc = allocator
        self.max_running = max_running
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.free_slots: list[int] = []
        self.num_slots = 0

    # -- admission -----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.alloc.page_tokens)

    # -- one step ------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep | None:
        step = self._schedule_prefill() or self._schedule_decode()
        if step is None and self.waiting:
            # Nothing running and the queue head cannot get pages: partly prefilled sequences behind it hold
            # them. Send those back to the start so the head can proceed (they are recomputed later).
            for seq in list(self.waiting)[1:]:
                if seq.block_table:
                    self._restart(seq)
            step = self._schedule_prefill()
        return step

    def _schedule_prefill(self) -> ScheduledStep | None:
        budget = self.chunk_tokens
        chosen: list[tuple[Sequence, int]] = []
        admitted = 0
        for seq in list(self.waiting):
            if budget <= 0:
                break
            if len(self.running) + admitted >= self.max_running:  # waiting sequences are never running
                break
            if seq.num_computed == 0 and not seq.block_table:
                self._match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            need = self.pages_for(seq.num_computed + n) - len(seq.block_table)
            if not self.alloc.can_allocate(need):
                break  # FCFS: later requests wait behind this one
            seq.block_table += self.alloc.allocate(need)
            chosen.append((seq, n))
            budget -= n
            admitted += 1
        if not chosen:
            return None
        seqs, plans, ids, samples = [], [], [], []
        for seq, n in chosen:
            plans.append(self._seq_plan(seq, seq.num_computed, n))
            ids += seq.token_slice(seq.num_computed, seq.num_computed + n)
            done = seq.num_computed + n == seq.num_tokens
            samples.append(seq.sample_spec() if done else None)
            seqs.append(seq)
        return ScheduledStep(StepPlan(plans, ids, is_decode=False), seqs, samples)

    def _schedule_decode(self) -> ScheduledStep | None:
        if not self.running:
            return None
        for seq in list(self.running):
            if seq.status != Status.RUNNING:
                continue  # preempted by an earlier sequence of this loop
            need = self.pages_for(seq.num_tokens) - len(seq.block_table)
            while need > 0 and not self.alloc.can_allocate(need):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status == Status.RUNNING and need > 0:
                seq.block_table += self.alloc.allocate(need)
        if not self.running:
            return None
        plans = [self._seq_plan(s, s.num_tokens - 1, 1) for s in self.running]
        ids = [s.last_token for s in self.running]
        return ScheduledStep(StepPlan(plans, ids, is_decode=True), list(self.running),
                             [s.sample_spec() for s in self.running])

    def schedule_ahead(self, step: ScheduledStep, finishes: Callable[[Sequence], bool]) -> ScheduledStep | None:
        """The decode step after `step`, planned while `step` is still on the GPU (overlap scheduling): each
        of its sequences is assumed to gain the one token `step` is computing, which the ranks feed in from
        the device (`prev_rows`). Sequences that `finishes` says end with that token are left out. None when
        the step cannot be planned ahead: `step` is not a decode step, prompts are waiting (they go first),
        or the pool would need a preemption (the ordinary path decides those)."""
        if not step.plan.is_decode or self.waiting:
            return None
        rows = [i for i, s in enumerate(step.seqs) if s.status == Status.RUNNING and not finishes(s)]
        if not rows:
            return None
        seqs = [step.seqs[i] for i in rows]
        needs = [self.pages_for(s.num_tokens + 1) - len(s.block_table) for s in seqs]
        if not self.alloc.can_allocate(sum(needs)):
            return None
        for s, need in zip(seqs, needs):
            if need > 0:
                s.block_table += self.alloc.allocate(need)
        plans = [self._seq_plan(s, s.num_tokens, 1) for s in seqs]
        samples = [replace(s.sample_spec(), step=len(s.output_ids) + 1) for s in seqs]
        return ScheduledStep(StepPlan(plans, [-1] * len(seqs), is_decode=True, prev_rows=rows), seqs, samples)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _seq_plan(self, seq: Sequence, start: int, num_new: int) -> SeqPlan:
        """The sequence's part of a step plan, with only the pages the ranks' BlockTables lack. Every plan
        made is sent, in the order made, so what it sends counts as delivered."""
        if seq.slot is None:  # then sent_pages is 0 (`_drop_pages` resets both)
            if self.free_slots:
                seq.slot = self.free_slots.pop()
            else:
                seq.slot, self.num_slots = self.num_slots, self.num_slots + 1
        plan = SeqPlan(seq.block_table[seq.sent_pages :], start, num_new, slot=seq.slot, table_from=seq.sent_pages)
        seq.sent_pages = len(seq.block_table)
        return plan

    def _drop_pages(self, seq: Sequence) -> None:
        """Release the sequence's pages and its slot (a reused slot is re-sent from entry 0)."""
        self.alloc.release(seq.block_table)
        seq.block_table = []
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot, seq.sent_pages = None, 0

    def _restart(self, seq: Sequence) -> None:
        """Back to nothing computed: pages and slot released, to be recomputed (or found again as a prefix)."""
        self._drop_pages(seq)
        seq.page_hashes, seq.num_computed = [], 0

    def _match_prefix(self, seq: Sequence) -> None:
        # Never reuse the page holding the last token: it must be computed to produce logits, and writing
        # into a shared page would change another sequence's cache.
        pages, hashes = self.alloc.match_prefix(seq.tokens, seq.num_tokens - 1)
        seq.block_table = pages
        seq.page_hashes = hashes
        seq.num_computed = len(pages) * self.alloc.page_tokens
        if seq.num_preemptions == 0:
            seq.cached_tokens = seq.num_computed
            self.alloc.record_query(seq.num_tokens, seq.num_computed)

    def complete(self, step: ScheduledStep, tokens: list[int | None]) -> None:
        """Account a finished forward: advance computed counts, admit prefilled sequences, append tokens."""
        for seq, sp, tok in zip(step.seqs, step.plan.seqs, tokens):
            if seq.status == Status.FINISHED:
                continue
            seq.num_computed = sp.ctx_len
            self._register_full_pages(seq)
            if not step.plan.is_decode and seq.num_computed == seq.num_tokens and seq.status == Status.WAITING:
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            if tok is not None:
                seq.output_ids.append(tok)

    def _register_full_pages(self, seq: Sequence) -> None:
        n = self.alloc.page_tokens
        full = seq.num_computed // n
        if len(seq.page_hashes) >= full:
            return
        while len(seq.page_hashes) < full:
            i = len(seq.page_hashes)
            prev = seq.page_hashes[-1] if seq.page_hashes else None
            page = tuple(seq.token_slice(i * n, (i + 1) * n))
            seq.page_hashes.append(self.alloc.register(seq.block_table[i], prev, page))

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_pages(seq)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._restart(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
