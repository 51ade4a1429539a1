"""The per-step plan (what the scheduler sends to every rank) and the per-rank metadata built from it once
per step. Layers read layout facts from here; they never recompute slot math themselves."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dcpserve.kv.layout import SlotLayout


@dataclass
class SeqPlan:
    # Global page ids: the whole block table, or (slot >= 0) only its entries from `table_from` on, the ones
    # the ranks' `BlockTables` row `slot` does not hold yet (a decode step usually sends none).
    block_table: list[int]
    start: int  # tokens already in the cache (cached prefix) before this step
    num_new: int  # tokens computed this step
    slot: int = -1
    table_from: int = 0

    @property
    def ctx_len(self) -> int:
        return self.start + self.num_new

    @property
    def num_pages(self) -> int:
        return self.table_from + len(self.block_table)


class BlockTables:
    """A rank's copy of the block tables of the sequences in flight, one row per scheduler slot, kept current
    by the plans' deltas (`SeqPlan.block_table` from `table_from`, applied in plan order). Steps then carry
    only new pages instead of whole tables: at 32 sequences x 32K tokens, sending, unpickling and rebuilding
    2K-entry lists per sequence took ~6 ms of host time per step (CPU measurement, docs/PERF.md section 4).
    Entries past a row's `num_pages` may be stale (a reused slot); `rows` zeroes them."""

    def __init__(self) -> None:
        self.table = torch.zeros(0, 0, dtype=torch.long)

    def _fit(self, rows: int, cols: int) -> None:
        r, c = self.table.shape
        if rows <= r and cols <= c:
            return
        grown = torch.zeros(max(rows, 2 * r, 8), max(cols, 2 * c, 64), dtype=torch.long)
        grown[:r, :c] = self.table
        self.table = grown

    def apply(self, seqs: list[SeqPlan]) -> None:
        for s in seqs:
            if s.slot < 0:
                raise ValueError("a delta plan's sequence has no slot")
            self._fit(s.slot + 1, s.num_pages)
            if s.block_table:
                self.table[s.slot, s.table_from : s.num_pages] = torch.tensor(s.block_table, dtype=torch.long)

    def rows(self, seqs: list[SeqPlan], width: int) -> torch.Tensor:
        """[len(seqs), width] block tables of these sequences, 0 past each one's pages."""
        self._fit(1, width)
        t = self.table[torch.tensor([s.slot for s in seqs], dtype=torch.long), :width]
        used = torch.tensor([s.num_pages for s in seqs], dtype=torch.long)
        return t.masked_fill(torch.arange(width)[None, :] >= used[:, None], 0)


@dataclass
class StepPlan:
    """Identical on every rank. `is_decode`: every sequence adds one token and attention takes the DCP
    merge path; otherwise the prefill path (gather the cached prefix, own heads, no merge)."""

    seqs: list[SeqPlan]
    input_ids: list[int]
    is_decode: bool
    # Overlap scheduling: sequence i's input id is token prev_rows[i] of the step before, which the ranks
    # hold on the device (input_ids are placeholders then). None: input_ids are the ids.
    prev_rows: list[int] | None = None


@dataclass
class ForwardBatch:
    is_decode: bool
    seqs: list[SeqPlan]
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] global positions
    write_rows: torch.Tensor  # [T] local latent rows; the dummy row for tokens owned elsewhere
    index_write_rows: torch.Tensor  # [T] rows of the indexer cache (global slots when it is replicated)
    cu_new: list[int]  # token offsets of each sequence in the flat batch
    # Prefill only: rows this rank owns of each sequence's cached prefix, ascending by position (what the
    # prefix gather sends; the positions are layout.local_positions(start, rank)). Empty in decode.
    own_rows: list[torch.Tensor]
    last_idx: torch.Tensor  # [B] index of each sequence's last token in the flat batch
    # Batched (padded) views for the paged kernels.
    block_table: torch.Tensor  # [B, max_pages] global page ids (0-padded; never read past the lengths)
    ctx_lens: torch.Tensor  # [B] context length after this step
    local_lens: torch.Tensor  # [B] tokens this rank holds of the attended range (decode: context; prefill: prefix)
    max_ctx_len: int
    max_local_len: int
    dcp_rank: int = 0
    layout: SlotLayout = field(default=None)  # type: ignore[assignment]
    # Prefill with DCP only: per sequence, where the prefix gather's rows go (layout.gather_order(start)),
    # on the device before the forward starts, so the layers never copy index tensors from the host.
    prefix_dest: list[torch.Tensor] = field(default_factory=list)
    # Prefill: offsets of each sequence's whole context (prefix + new) in the flat context the layers build,
    # and (cu_new, cu_ctx) as int32 on the device for the varlen kernels. Unused in decode.
    cu_ctx: list[int] = field(default_factory=list)
    cu_dev: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    def seq_tokens(self, i: int) -> slice:
        return slice(self.cu_new[i], self.cu_new[i + 1])


def to_device(host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """A step's host metadata on the device in one pinned, non-blocking copy. A plain `.to(cuda)` from
    pageable memory waits for the stream to drain: it would hold the host work of the next step behind the
    GPU work of this one, which overlap scheduling exists to hide (and each costs ~15 us besides). The
    caching host allocator keeps a pinned block until the copy that reads it has run."""
    if device.type != "cuda":
        return [t.to(device) for t in host]
    flat = torch.cat([t.reshape(-1).to(torch.long) for t in host]).pin_memory().to(device, non_blocking=True)
    out, o = [], 0
    for t in host:
        out.append(flat[o : o + t.numel()].view(t.shape).to(t.dtype))
        o += t.numel()
    return out


def build_forward_batch(plan: StepPlan, layout: SlotLayout, dcp_rank: int, dummy_row: int, index_dummy_row: int,
                        indexer_replicated: bool, device: torch.device,
                        prev_tokens: torch.Tensor | None = None, tables: BlockTables | None = None) -> ForwardBatch:
    """`prev_tokens`: the held step's sampled tokens on the device, read when `plan.prev_rows` is set.
    `tables`: this rank's BlockTables, required when the plan carries deltas (slot >= 0); they are applied."""
    b = len(plan.seqs)
    max_pages = max((s.num_pages for s in plan.seqs), default=0)
    # One host tensor per quantity for the whole batch: per-sequence tensor ops cost ~10 us each, which at
    # batch 128 made building this metadata take longer than the decode step's kernels.
    width = max(max_pages, 1)
    if any(s.slot >= 0 for s in plan.seqs):
        if tables is None:
            raise ValueError("a plan with block-table deltas needs the rank's BlockTables")
        tables.apply(plan.seqs)
        table = tables.rows(plan.seqs, width)
    else:
        table = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in plan.seqs],
                             dtype=torch.long).view(b, width)  # 0-padded; never read past the lengths
    cu = [0]
    for s in plan.seqs:
        cu.append(cu[-1] + s.num_new)
    starts = torch.tensor([s.start for s in plan.seqs], dtype=torch.long)
    if plan.is_decode:  # one token each (and repeat_interleave took ~7 ms at batch 128 on a 64-thread host)
        seq_of = torch.arange(b)
    else:
        counts = torch.tensor([s.num_new for s in plan.seqs], dtype=torch.long)
        seq_of = torch.repeat_interleave(torch.arange(b), counts)
    positions = starts[seq_of] + torch.arange(cu[-1]) - torch.tensor(cu[:-1], dtype=torch.long)[seq_of]
    slots = layout.batch_slots_of(table, seq_of, positions)
    owned = layout.owner(slots) == dcp_rank
    write_rows = torch.where(owned, layout.local_row(slots), torch.full_like(slots, dummy_row))
    index_rows = slots if indexer_replicated else torch.where(owned, write_rows, torch.full_like(slots, index_dummy_row))
    i32 = torch.int32  # what the kernels take for tables and lengths
    # Prefill only: varlen offsets and, per sequence, the prefix rows this rank owns and (DCP) where the
    # gathered rows go. They ride in the step's one copy: a separate .to(device) each would wait for the
    # previous step's kernels to finish before this step could be queued.
    cu_ctx: list[int] = []
    extra: list[torch.Tensor] = []
    if plan.is_decode:  # decode reads through the block table; only the count is needed here
        local_lens = [layout.local_count(s.ctx_len, dcp_rank) for s in plan.seqs]
    else:  # prefill gathers the cached prefix's rows from the group
        cu_ctx = [0]
        for s in plan.seqs:
            cu_ctx.append(cu_ctx[-1] + s.ctx_len)
        opos = [layout.local_positions(s.start, dcp_rank) for s in plan.seqs]
        local_lens = [len(p) for p in opos]
        extra = [torch.tensor(cu, dtype=i32), torch.tensor(cu_ctx, dtype=i32)]
        extra += [layout.local_rows_of_positions(table[i, : s.num_pages], opos[i]) for i, s in enumerate(plan.seqs)]
        if layout.dcp > 1:
            extra += [layout.gather_order(s.start) for s in plan.seqs]
    host = [torch.tensor(plan.input_ids if plan.prev_rows is None else plan.prev_rows, dtype=torch.long),
            positions, write_rows, index_rows, torch.tensor([c - 1 for c in cu[1:]], dtype=torch.long),
            table.to(i32), torch.tensor([s.ctx_len for s in plan.seqs], dtype=i32), torch.tensor(local_lens, dtype=i32)]
    dev = to_device(host + extra, device)
    ids, positions, write_rows, index_rows, last_idx, table_d, ctx_lens, local_lens_d = dev[:8]
    cu_dev = (dev[8], dev[9]) if extra else None
    own_rows, prefix_dest = dev[10 : 10 + b], dev[10 + b :]
    if plan.prev_rows is not None:
        if prev_tokens is None:
            raise RuntimeError("a step planned ahead arrived without the tokens of the step before it")
        ids = prev_tokens[ids]
    return ForwardBatch(
        is_decode=plan.is_decode,
        seqs=plan.seqs,
        input_ids=ids,
        positions=positions,
        write_rows=write_rows,
        index_write_rows=index_rows,
        cu_new=cu,
        cu_ctx=cu_ctx,
        cu_dev=cu_dev,
        own_rows=own_rows,
        last_idx=last_idx,
        block_table=table_d,
        ctx_lens=ctx_lens,
        local_lens=local_lens_d,
        max_ctx_len=max((s.ctx_len for s in plan.seqs), default=0),
        max_local_len=max(local_lens, default=0),
        dcp_rank=dcp_rank,
        layout=layout,
        prefix_dest=prefix_dest,
    )
