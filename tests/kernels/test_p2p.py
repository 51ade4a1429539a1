"""Peer-to-peer DCP collectives (kernels/p2p.py) against their torch references. On CPU the d ranks are
simulated in one process with the Triton interpreter: every rank's buffer is a CPU tensor, each rank's
launch runs its signalling half, then each rank its waiting-and-reading half. Also checks that every
counter is back at 0 afterwards (each signal consumed exactly once). The real multi-GPU run is
tests/test_p2p_gpu.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from dcpserve.kernels.merge import merge_lse  # noqa: E402
from dcpserve.kernels.p2p import (  # noqa: E402
    SIGNAL_WORDS,
    PeerTable,
    p2p_gather,
    p2p_gather_ref,
    p2p_merge,
    p2p_merge_ref,
    peer_width,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _buffers(d: int, words: int) -> tuple[list[torch.Tensor], list[PeerTable]]:
    bufs = [torch.zeros(SIGNAL_WORDS + words, dtype=torch.int32, device=DEV) for _ in range(d)]
    w = peer_width(d)
    bases = torch.tensor([b.data_ptr() for b in bufs] + [0] * (w - d), dtype=torch.int64, device=DEV)
    return bufs, [PeerTable(bases, r, d) for r in range(d)]


def _counters_zero(bufs: list[torch.Tensor]) -> bool:
    return all(int(b[:SIGNAL_WORDS].abs().sum()) == 0 for b in bufs)


GPU = pytest.mark.skipif(DEV == "cpu", reason="large shapes: too slow in the interpreter")


# The GPU-only cases reach the launchers' large-payload settings (2048-word steps, 4-row blocks, CTAs looping).
@pytest.mark.parametrize("d,b,m", [(2, 1, 9), (3, 2, 700), (4, 3, 64), (4, 1, 5000),
                                   pytest.param(2, 64, 18432, marks=GPU), pytest.param(4, 37, 9216, marks=GPU)])
def test_gather_matches_ref(d, b, m):
    g = torch.Generator().manual_seed(d * 100 + m)
    xs = [torch.randint(-2**31, 2**31 - 1, (b, m), generator=g, dtype=torch.int64).to(torch.int32).to(DEV)
          for _ in range(d)]
    bufs, tables = _buffers(d, b * m + 16)
    outs = [torch.full((b, d, m), 7, dtype=torch.int32, device=DEV) for _ in range(d)]
    region = SIGNAL_WORDS + 16  # a region that does not start right after the counters
    for r in range(d):
        p2p_gather(xs[r], outs[r], tables[r], region, phase=1)
    for r in range(d):
        p2p_gather(xs[r], outs[r], tables[r], region, phase=2)
    ref = p2p_gather_ref(xs)
    for r in range(d):
        assert torch.equal(outs[r], ref), f"rank {r}"
    assert _counters_zero(bufs)


def test_gather_carries_bf16_and_int64_bit_exactly():
    d, b = 2, 2
    q = [torch.randn(b, 3, 8, device=DEV).bfloat16() for _ in range(d)]
    keys = [torch.randint(-2**62, 2**62, (b, 5), device=DEV) for _ in range(d)]
    for xs in (q, keys):
        words = [x.reshape(b, -1).view(torch.int32) for x in xs]
        m = words[0].shape[1]
        bufs, tables = _buffers(d, b * m)
        outs = [torch.empty(b, d, m, dtype=torch.int32, device=DEV) for _ in range(d)]
        for ph in (1, 2):
            for r in range(d):
                p2p_gather(words[r], outs[r], tables[r], SIGNAL_WORDS, phase=ph)
        got = outs[1].view(xs[0].dtype).view(b, d, *xs[0].shape[1:])
        assert torch.equal(got, torch.stack(xs, dim=1))


def _partials(g: torch.Generator, d: int, b: int, h: int, v: int):
    outs = [torch.randn(b, d * h, v, generator=g).to(DEV) for _ in range(d)]
    lses = [(torch.randn(b, d * h, generator=g) * 4).to(DEV) for _ in range(d)]
    lses[0][0, 0] = float("-inf")  # rank 0 owns no key for (0, 0)
    outs[0][0, 0] = float("nan")  # garbage in an empty partial must not leak
    lses[d - 1][:, h - 1] = float("nan")
    for s in lses:
        s[b - 1, d * h - 1] = float("-inf")  # nobody owns a key: 0 / -inf
    return outs, lses


# rows: rows per block (None: the launcher's choice, 1 at these sizes); (2, 3, 48, 16) has more blocks (144)
# than CTAs (MAX_CTAS), so CTAs loop over several; ragged last blocks where rows does not divide b * h.
@pytest.mark.parametrize("d,b,h,v,rows", [(2, 1, 3, 64, None), (4, 2, 2, 80, None), (3, 5, 16, 32, None),
                                          (2, 1, 3, 64, 2), (4, 3, 5, 80, 4), (3, 5, 7, 32, 4), (2, 3, 48, 16, None),
                                          pytest.param(2, 64, 64, 512, None, marks=GPU),
                                          pytest.param(4, 33, 32, 512, None, marks=GPU)])
def test_merge_matches_ref_and_merge_lse(d, b, h, v, rows):
    g = torch.Generator().manual_seed(d + b + h + v)
    outs, lses = _partials(g, d, b, h, v)
    n = b * d * h
    part, lse_at = SIGNAL_WORDS + 8, SIGNAL_WORDS + 8 + n * v
    bufs, tables = _buffers(d, 8 + n * v + n)
    for r in range(d):
        bufs[r].view(torch.float32)[part:part + n * v] = outs[r].flatten()
        bufs[r].view(torch.float32)[lse_at:lse_at + n] = lses[r].flatten()
    got = [(torch.empty(b, h, v, device=DEV), torch.empty(b, h, device=DEV)) for _ in range(d)]
    for ph in (1, 2):
        for r in range(d):
            p2p_merge(*got[r], tables[r], part, lse_at, b, h, phase=ph, rows_per_block=rows)
    assert _counters_zero(bufs)
    for r in range(d):
        ref_o, ref_l = p2p_merge_ref(outs, lses, r, h)
        assert not torch.isnan(got[r][0]).any()
        torch.testing.assert_close(got[r][0], ref_o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[r][1], ref_l, atol=1e-5, rtol=1e-5)
        # Same weights helper and order as the all-to-all path's merge kernel: the same bits.
        own = slice(r * h, (r + 1) * h)
        a2a_o, a2a_l = merge_lse(torch.stack([o[:, own] for o in outs]), torch.stack([s[:, own] for s in lses]))
        assert torch.equal(got[r][0], a2a_o) and torch.equal(got[r][1], a2a_l)


def test_bad_shapes_are_refused():
    bufs, tables = _buffers(2, 64)
    with pytest.raises(ValueError):
        x = torch.zeros(2, 4, dtype=torch.int32, device=DEV)
        p2p_gather(x, torch.zeros(2, 3, 4, dtype=torch.int32, device=DEV), tables[0], SIGNAL_WORDS)  # d is 2
    with pytest.raises(ValueError):
        out, lse = torch.zeros(1, 2, 8, device=DEV), torch.zeros(1, 3, device=DEV)  # lse has 3 heads
        p2p_merge(out, lse, tables[0], SIGNAL_WORDS, SIGNAL_WORDS, 1, 2)
