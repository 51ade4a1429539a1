"""The per-step plan (what the scheduler sends to every rank) and the per-rank metadata built from it once
per step. Layers read layout facts from here; they never recompute slot math themselves."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dcpserve.kv.layout import SlotLayout


@dataclass
class SeqPlan:
    block_table: list[int]  # global page ids
    start: int  # tokens already in the cache (cached prefix) before this step
    num_new: int  # tokens computed this step

    @property
    def ctx_len(self) -> int:
        return self.start + self.num_new


@dataclass
class StepPlan:
    """Identical on every rank. `is_decode`: every sequence adds one token and attention takes the DCP
    merge path; otherwise the prefill path (gather the cached prefix, own heads, no merge)."""

    seqs: list[SeqPlan]
    input_ids: list[int]
    is_decode: bool
    kind: str = "forward"  # "forward" or "shutdown"


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

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    def seq_tokens(self, i: int) -> slice:
        return slice(self.cu_new[i], self.cu_new[i + 1])


def build_forward_batch(plan: StepPlan, layout: SlotLayout, dcp_rank: int, dummy_row: int, index_dummy_row: int,
                        indexer_replicated: bool, device: torch.device) -> ForwardBatch:
    b = len(plan.seqs)
    max_pages = max((len(s.block_table) for s in plan.seqs), default=0)
    # One host tensor per quantity for the whole batch: per-sequence tensor ops cost ~10 us each, which at
    # batch 128 made building this metadata take longer than the decode step's kernels.
    width = max(max_pages, 1)
    table = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in plan.seqs],
                         dtype=torch.long).view(b, width)  # 0-padded; never read past the lengths
    cu = [0]
    for s in plan.seqs:
        cu.append(cu[-1] + s.num_new)
    starts = torch.tensor([s.start for s in plan.seqs], dtype=torch.long)
    seq_of = torch.repeat_interleave(torch.arange(b), torch.tensor([s.num_new for s in plan.seqs], dtype=torch.long))
    positions = starts[seq_of] + torch.arange(cu[-1]) - torch.tensor(cu[:-1], dtype=torch.long)[seq_of]
    slots = layout.batch_slots_of(table, seq_of, positions)
    owned = layout.owner(slots) == dcp_rank
    write_rows = torch.where(owned, layout.local_row(slots), torch.full_like(slots, dummy_row))
    index_rows = slots if indexer_replicated else torch.where(owned, write_rows, torch.full_like(slots, index_dummy_row))
    own_rows: list[torch.Tensor] = []
    if plan.is_decode:  # decode reads through the block table; only the count is needed here
        local_lens = [layout.local_count(s.ctx_len, dcp_rank) for s in plan.seqs]
    else:  # prefill gathers the cached prefix's rows from the group
        local_lens = []
        for i, s in enumerate(plan.seqs):
            opos = layout.local_positions(s.start, dcp_rank)
            own_rows.append(layout.local_rows_of_positions(table[i, : len(s.block_table)], opos).to(device))
            local_lens.append(len(opos))
    return ForwardBatch(
        is_decode=plan.is_decode,
        seqs=plan.seqs,
        input_ids=torch.tensor(plan.input_ids, dtype=torch.long, device=device),
        positions=positions.to(device),
        write_rows=write_rows.to(device),
        index_write_rows=index_rows.to(device),
        cu_new=cu,
        own_rows=own_rows,
        last_idx=torch.tensor([c - 1 for c in cu[1:]], dtype=torch.long, device=device),
        block_table=table.to(device=device, dtype=torch.int32),  # int32: what the kernels take
        ctx_lens=torch.tensor([s.ctx_len for s in plan.seqs], dtype=torch.int32, device=device),
        local_lens=torch.tensor(local_lens, dtype=torch.int32, device=device),
        max_ctx_len=max((s.ctx_len for s in plan.seqs), default=0),
        max_local_len=max(local_lens, default=0),
        dcp_rank=dcp_rank,
        layout=layout,
        prefix_dest=[] if plan.is_decode or layout.dcp == 1 else
                    [layout.gather_order(s.start).to(device) for s in plan.seqs],
    )
