"""`--dcp-comm p2p` on real GPUs: d processes (d = 2 and, with 4 GPUs, 4) on NCCL, each with a PeerComm.
Checks, per rank, against the NCCL collectives of attention/dcp.py on the same data:
- the query all-gather and the candidate all-gather, bit for bit (bf16 and int64 payloads);
- the merge, bit for bit against merge_a2a + the Triton merge, with the partials written in place
  (`partials()`) and copied in;
- CUDA-graph capture: one graph of gather + merge, replayed with new inputs, equals eager every time;
- 300 back-to-back layers' worth of collectives (both gathers and the merge) of random sizes with random
  per-rank delays (the counters' semaphore logic
  under real concurrency) without a hang or a wrong value;
- batches too large for the buffers are refused (None), so callers take the NCCL path.
Skipped without 2 GPUs (CPU CI); the kernels' logic is covered there by tests/kernels/test_p2p.py."""
from __future__ import annotations

import json
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dcpserve.distributed.launcher import free_port

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(NGPU < 2, reason="needs 2 CUDA GPUs")



def _rank_main(rank: int, d: int, port: int, out_dir: str) -> None:
    fails: dict[str, str] = {}
    try:
        from dcpserve.attention.dcp import gather_heads, merge_a2a
        from dcpserve.attention.triton_backend import TritonBackend
        from dcpserve.distributed.comm import dcp_all_gather
        from dcpserve.distributed.p2p import PeerComm, plan_regions
        from dcpserve.distributed.parallel import destroy_parallel, init_parallel

        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        ps = init_parallel(rank, d, d, dev, f"tcp://127.0.0.1:{port}")
        h, dim, k, v = 16, 576, 64, 512
        comm = PeerComm(ps, plan_regions(4, h, d, dim, 2, k, v))
        be = TritonBackend()

        def check(name: str, ok: bool, msg: str = "") -> None:
            if not ok and name not in fails:
                fails[name] = msg or "mismatch"

        def data(seed: int, b: int):
            g = torch.Generator(device=dev).manual_seed(seed * 16 + rank)
            q = torch.randn(b, h, dim, generator=g, device=dev).bfloat16()
            keys = torch.randint(-2**62, 2**62, (b, k), generator=g, device=dev)
            out = torch.randn(b, d * h, v, generator=g, device=dev)
            lse = torch.randn(b, d * h, generator=g, device=dev) * 4
            lse[0, rank] = float("-inf")  # empty partials
            out[0, rank] = float("nan")
            return q, keys, out, lse

        def nccl(q, keys, out, lse):
            rows = dcp_all_gather(ps, keys).permute(1, 0, 2).reshape(keys.shape[0], -1)
            return gather_heads(ps, q), rows, merge_a2a(ps, be, out, lse)

        def p2p(q, keys, out, lse, in_place: bool):
            # Gathers first, as in a layer: their barrier is what makes rewriting PART safe (a peer may still
            # be reading this rank's PART from the previous merge until it has entered the next collective).
            got_q, got_k = comm.gather_heads(q), comm.gather_rows(keys)
            if in_place:
                dest = comm.partials(out.shape[0], h, v)
                dest[0].copy_(out)
                dest[1].copy_(lse)
                out, lse = dest
            return got_q, got_k, comm.merge(out, lse)

        for seed, b in enumerate((1, 3, 4)):
            x = data(seed, b)
            want = nccl(*x)
            for in_place in (False, True):
                got = p2p(*x, in_place=in_place)
                for name, a, w in zip(("gather_heads", "gather_rows", "merge"), got, want):
                    check(name, a is not None and torch.equal(a, w), f"b={b} in_place={in_place}")

        # CUDA graph: static inputs, one capture, several replays with new data.
        x = data(10, 2)
        static = [t.clone() for t in x]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                p2p(*static, in_place=True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out = p2p(*static, in_place=True)
        for seed in range(11, 15):
            x = data(seed, 2)
            for t, src in zip(static, x):
                t.copy_(src)
            graph.replay()
            want = nccl(*x)
            check("graph_replay", all(torch.equal(a, w) for a, w in zip(g_out, want)), f"seed {seed}")

        # Many collectives back to back, ranks delayed at random: counters must neither hang nor mix data.
        gen = torch.Generator().manual_seed(99)  # same sizes on every rank
        for it in range(300):
            b = int(torch.randint(1, 5, (1,), generator=gen))
            if int(torch.randint(0, 4, (1,), generator=torch.Generator().manual_seed(it * 8 + rank))) == 0:
                torch.cuda._sleep(20000)  # this rank lags a little
            x = data(100 + it, b)
            got = p2p(*x, in_place=it % 2 == 0)  # merge grids vary with b, as the gathers' do
            if it % 50 == 0:
                check("stress", all(torch.equal(a, w) for a, w in zip(got, nccl(*x))), f"iteration {it}")
        torch.cuda.synchronize()

        big = torch.zeros(5, h, dim, dtype=torch.bfloat16, device=dev)
        check("too_big_refused", comm.gather_heads(big) is None and comm.partials(5, h, v) is None)
        destroy_parallel()
    except Exception:
        fails["exception"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(fails, f)


@pytest.mark.parametrize("d", [2, 4])
def test_p2p_collectives_on_gpus(d, tmp_path):
    if d > NGPU:
        pytest.skip(f"needs {d} GPUs")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, d, port, str(tmp_path))) for r in range(d)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} hung"
    for r in range(d):
        fails = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert not fails, f"rank {r}: {fails}"
