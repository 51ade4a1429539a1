"""CUDA graphs for decode steps.

A graph is captured lazily per (padded batch size, page-table width bucket, sparse-or-dense) the first time
a decode step needs it, on every rank at the same step (the plan is identical everywhere, so the NCCL
collectives inside are captured in the same order). Replay copies the step's metadata into the graph's
static buffers first: nothing in the captured region reads host state or syncs (see DESIGN section 2,
step 8): padded batch slots write to the dummy row and attend over zero tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dcpserve.engine.forward_batch import ForwardBatch, SeqPlan

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    for b in buckets:
        if n <= b:
            return b
    return None


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    fb: ForwardBatch  # static buffers the graph reads
    logits: torch.Tensor  # static output


class DecodeGraphs:
    def __init__(self, model, rt, dummy_row: int, index_dummy_row: int, max_batch: int, max_pages: int):
        self.model, self.rt = model, rt
        self.dummy_row, self.index_dummy_row = dummy_row, index_dummy_row
        self.max_batch = max_batch
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.max_pages = max(max_pages, 1)
        self.graphs: dict[tuple[int, int, bool], Captured] = {}
        self.pool = None

    def _page_bucket(self, pages: int) -> int:
        b = 16
        while b < pages:
            b *= 2
        return min(b, self.max_pages) if pages <= self.max_pages else pages

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.is_decode and fb.num_seqs <= self.max_batch

    def run(self, fb: ForwardBatch) -> torch.Tensor:
        bs = bucket(fb.num_seqs, self.batch_buckets)
        pages = self._page_bucket(fb.block_table.shape[1])
        sparse = self._sparse(fb)
        key = (bs, pages, sparse)
        cap = self.graphs.get(key)
        if cap is None:
            cap = self.graphs[key] = self._capture(fb, bs, pages, sparse)
        self._load(cap.fb, fb)
        cap.graph.replay()
        return cap.logits[: fb.num_seqs]

    def _sparse(self, fb: ForwardBatch) -> bool:
        cfg = self.model.cfg
        return cfg.has_indexer and fb.max_ctx_len > cfg.index_topk

    def _static(self, fb: ForwardBatch, bs: int, pages: int, sparse: bool) -> ForwardBatch:
        dev = fb.input_ids.device
        lay = fb.layout
        cap_len = pages * lay.page_size * lay.dcp  # longest context this graph serves
        k = self.model.cfg.index_topk
        z = lambda dtype: torch.zeros(bs, dtype=dtype, device=dev)  # noqa: E731
        return ForwardBatch(
            is_decode=True,
            seqs=[SeqPlan([], 0, 1)] * bs,
            input_ids=z(torch.long),
            positions=z(torch.long),
            write_rows=torch.full((bs,), self.dummy_row, dtype=torch.long, device=dev),
            index_write_rows=torch.full((bs,), self.index_dummy_row, dtype=torch.long, device=dev),
            cu_new=list(range(bs + 1)),
            own_rows=[],
            last_idx=torch.arange(bs, device=dev),
            block_table=torch.zeros(bs, pages, dtype=torch.int32, device=dev),
            ctx_lens=z(torch.int32),
            local_lens=z(torch.int32),
            # Host-side bounds the kernels size their grids and score buffers with: the graph's capacity.
            max_ctx_len=max(cap_len, k + 1) if sparse else min(cap_len, k) if k else cap_len,
            max_local_len=-(-cap_len // lay.dcp),
            dcp_rank=fb.dcp_rank,
            layout=lay,
        )

    def _load(self, static: ForwardBatch, fb: ForwardBatch) -> None:
        b = fb.num_seqs
        static.input_ids[:b].copy_(fb.input_ids)
        static.positions[:b].copy_(fb.positions)
        static.write_rows[:b].copy_(fb.write_rows)
        static.index_write_rows[:b].copy_(fb.index_write_rows)
        static.block_table[:b, : fb.block_table.shape[1]].copy_(fb.block_table)
        static.block_table[:b, fb.block_table.shape[1] :].zero_()
        static.ctx_lens[:b].copy_(fb.ctx_lens)
        static.local_lens[:b].copy_(fb.local_lens)
        # Padded slots: no tokens, writes to the dummy rows.
        static.write_rows[b:].fill_(self.dummy_row)
        static.index_write_rows[b:].fill_(self.index_dummy_row)
        static.ctx_lens[b:].zero_()
        static.local_lens[b:].zero_()

    def _capture(self, fb: ForwardBatch, bs: int, pages: int, sparse: bool) -> Captured:
        static = self._static(fb, bs, pages, sparse)
        static = replace(static, seqs=[SeqPlan([], static.max_ctx_len - 1, 1)] * bs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile Triton kernels and warm NCCL outside the capture
                self.model(static, self.rt)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(static, self.rt)
        if self.pool is None:
            self.pool = graph.pool()
        return Captured(graph, static, logits)
