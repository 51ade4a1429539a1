"""Token placement for decode context parallelism (DESIGN section 2, step 1).

The scheduler hands out KV slots in one *global* slot space that is identical on every rank. A global page
holds `page_size * dcp` slots. Global slot `s` is owned by rank `(s // I) % d` (I = interleave) and lives
in that rank's pool at local row `(s // (I * d)) * I + s % I`. Because a global page starts at a multiple
of `page_size * d`, global page `g` maps to local rows `[g * page_size, (g + 1) * page_size)` on every
rank: each rank's pool is an ordinary paged cache with page size `page_size`, and a sequence's block
table is the same list of page ids everywhere. Only the number of rows a sequence holds differs per rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotLayout:
    page_size: int
    dcp: int = 1
    interleave: int = 1

    def __post_init__(self) -> None:
        if self.page_size % self.interleave != 0:
            raise ValueError(f"interleave {self.interleave} must divide page_size {self.page_size}")

    @property
    def global_page_slots(self) -> int:
        return self.page_size * self.dcp

    def owner(self, slots: torch.Tensor) -> torch.Tensor:
        return torch.div(slots, self.interleave, rounding_mode="floor") % self.dcp

    def local_row(self, slots: torch.Tensor) -> torch.Tensor:
        i, d = self.interleave, self.dcp
        return torch.div(slots, i * d, rounding_mode="floor") * i + slots % i

    def slots_of(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Global slots of token `positions` of a sequence whose global pages are `block_table`."""
        return self.batch_slots_of(block_table[None], torch.zeros_like(positions), positions)

    def batch_slots_of(self, block_tables: torch.Tensor, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Global slots of tokens of several sequences at once: token t is at `positions[t]` of sequence
        `seq[t]`, whose global pages are row `seq[t]` of `block_tables` [B, max_pages]."""
        gps = self.global_page_slots
        pages = block_tables[seq, torch.div(positions, gps, rounding_mode="floor")]
        return pages * gps + positions % gps

    def owner_of_position(self, positions: torch.Tensor) -> torch.Tensor:
        # Page bases are multiples of page_size*d (hence of I*d), so ownership depends on the position alone.
        return torch.div(positions, self.interleave, rounding_mode="floor") % self.dcp

    def local_count(self, length: int, rank: int) -> int:
        """How many of a sequence's first `length` tokens rank `rank` owns."""
        i, d = self.interleave, self.dcp
        full, rem = divmod(length, i * d)
        return full * i + min(max(rem - rank * i, 0), i)

    def local_positions(self, length: int, rank: int) -> torch.Tensor:
        """Global positions (ascending) of the tokens of a `length`-token sequence that `rank` owns."""
        pos = torch.arange(length, dtype=torch.long)
        return pos[self.owner_of_position(pos) == rank]

    def gather_order(self, length: int) -> torch.Tensor:
        """Global positions of a `length`-token prefix in the order a DCP all-gather delivers its rows:
        rank by rank, each rank's owned positions ascending."""
        return torch.cat([self.local_positions(length, r) for r in range(self.dcp)])

    def local_position_table(self, rank: int, lens: torch.Tensor, max_len: int, pad: int) -> torch.Tensor:
        """[B, max_len]: global position of the j-th token rank `rank` holds of each sequence; `pad` past
        lens[b]. Computed on the device from the lengths alone (no host work per token, graph-safe)."""
        i, d = self.interleave, self.dcp
        j = torch.arange(max_len, device=lens.device)
        pos = torch.div(j, i, rounding_mode="floor") * (i * d) + rank * i + j % i
        return torch.where(j[None, :] < lens[:, None].long(), pos[None, :], torch.full_like(pos[None, :], pad))

    def local_rows_of_positions(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.local_row(self.slots_of(block_table, positions))

    def pages_needed(self, length: int) -> int:
        return -(-length // self.global_page_slots)
