"""The DCP collectives on real gloo process groups: d in {2, 4} processes spawned with torch.multiprocessing,
each running `init_parallel(rank, tp=d, dcp=d)`. Every rank builds the same random data from fixed seeds,
runs the collective, and compares with the single-process reference (`merge_partials`, `ordered_topk`, the
global prefix). Each rank records failures per check in a JSON file; the tests below read them, so one
process group per d serves all checks. A hung collective fails by timeout instead of hanging the suite."""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from dcpserve.distributed.launcher import free_port

SEEDS = [0, 1, 2, 3, 4, 5]
CHECKS = ["gather_heads", "merge_a2a", "merge_ag_rs", "merge_empty_shards", "merge_nan_garbage_a2a",
          "merge_nan_garbage_ag_rs", "decode_select_sharded", "decode_select_one_rank", "gather_prefix_rows",
          "merge_a2a_triton", "decode_select_triton"]
NEG = float("-inf")
TIMEOUT_S = 60
TRITON = importlib.util.find_spec("triton") is not None



# -- the per-rank checks (run inside the spawned processes) -------------------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> str | None:
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if torch.isnan(a).any():
        return "NaN in result"
    if not torch.allclose(a, b, rtol=tol, atol=tol):
        return f"max abs diff {float((a - b).abs().max())}"
    return None


def _partials(g: torch.Generator, d: int, empty_mode: str):
    """Full attention of B queries x (d*H) heads over m keys, split among d "ranks" by a random owner; returns
    per-rank partials [d, B, dH, V], [d, B, dH] (TorchBackend), the single-process merge, and the full result."""
    from dcpserve.attention.backend import TorchBackend
    from dcpserve.attention.merge import merge_partials

    be = TorchBackend()
    b = int(torch.randint(1, 4, (1,), generator=g))
    h = int(torch.randint(1, 4, (1,), generator=g))
    dim = 6
    v = int(torch.randint(1, dim + 1, (1,), generator=g))
    m = int(torch.randint(0, 3 * d + 1, (1,), generator=g))
    q = torch.randn(b, d * h, dim, generator=g) * 2
    kv = torch.randn(m, dim, generator=g)
    owner = torch.randint(0, d, (m,), generator=g)
    if empty_mode == "rank0_empty":
        owner = torch.where(owner == 0, torch.ones_like(owner), owner)  # rank 0 owns no keys
    elif empty_mode == "all_on_last":
        owner = torch.full_like(owner, d - 1)
    mask = torch.rand(b, m, generator=g) < 0.6  # some queries see nothing on some (or all) ranks
    outs, lses = [], []
    for r in range(d):
        sel = (owner == r).nonzero().flatten()
        o, l = be.attend(q, kv[sel], v, 0.5, mask[:, sel])
        outs.append(o)
        lses.append(l)
    outs, lses = torch.stack(outs), torch.stack(lses)
    ref, _ = merge_partials(outs, lses)
    full, _ = be.attend(q, kv, v, 0.5, mask)
    return outs, lses, ref, full, h


def _backend(name: str):
    from dcpserve.attention.backend import get_backend

    return get_backend(name)  # "triton": the kernels in Triton's interpreter (TRITON_INTERPRET, set by conftest)


def _check_merge(ps, g, name, empty_mode="random", garbage=False, backend="torch") -> str | None:
    from dcpserve.attention.dcp import merge_a2a, merge_ag_rs

    be = _backend(backend)
    d, r = ps.dcp_size, ps.dcp_rank
    outs, lses, ref, full, h = _partials(g, d, empty_mode)
    mine_o, mine_l = outs[r].clone(), lses[r].clone()
    if garbage:
        # An empty shard's output buffer may hold anything (an uninitialised kernel workspace).
        mine_o[~torch.isfinite(mine_l)] = float("nan")
    got = merge_a2a(ps, be, mine_o, mine_l) if "a2a" in name else merge_ag_rs(ps, mine_o, mine_l)
    own = slice(r * h, (r + 1) * h)
    err = _close(got, ref[:, own], 1e-5)
    if err:
        return f"vs merge_partials: {err}"
    err = _close(got, full[:, own], 1e-4)
    if err:
        return f"vs full attention: {err}"
    return None


def _check_gather_heads(ps, g) -> str | None:
    from dcpserve.attention.dcp import gather_heads

    d, r = ps.dcp_size, ps.dcp_rank
    allq = torch.randn(d, 3, 2, 5, generator=g)  # rank p's local heads
    got = gather_heads(ps, allq[r])
    want = allq.permute(1, 0, 2, 3).reshape(3, 2 * d, 5)
    return None if torch.equal(got, want) else "gathered heads out of DCP-rank order"


def _check_decode_select(ps, g, one_rank=False, triton=False) -> str | None:
    from dcpserve.attention.indexer import compact_owned, select_sharded
    from dcpserve.attention.topk import PAD_POS, key_positions, ordered_topk, pack_keys
    from dcpserve.engine.forward_batch import SeqPlan, StepPlan, build_forward_batch
    from dcpserve.kv.layout import SlotLayout

    d, r = ps.dcp_size, ps.dcp_rank
    page = [1, 2, 4][int(torch.randint(0, 3, (1,), generator=g))]
    divisors = [i for i in (1, 2, 4) if page % i == 0]
    inter = divisors[int(torch.randint(0, len(divisors), (1,), generator=g))]
    lay = SlotLayout(page, d, inter)
    k = int(torch.randint(1, 9, (1,), generator=g))
    b = int(torch.randint(1, 5, (1,), generator=g))
    # Context lengths: shorter than d, shorter than k, around k, longer than k.
    choices = [1, max(d - 1, 1), k, k + 1, 3 * k + 5, int(torch.randint(1, 40, (1,), generator=g))]
    ctx = [choices[int(torch.randint(0, len(choices), (1,), generator=g))] for _ in range(b)]
    full_scores = [torch.randint(0, 3, (c,), generator=g).float() for c in ctx]  # many ties
    if one_rank:
        hot = int(torch.randint(0, d, (1,), generator=g))
        full_scores = [s + 10.0 * (lay.owner_of_position(torch.arange(len(s))) == hot).float() for s in full_scores]
    # A decode step's metadata for these sequences (random distinct pages), as the engine builds it.
    n_pages = [lay.pages_needed(c) for c in ctx]
    perm = torch.randperm(sum(n_pages) + 3, generator=g).tolist()
    tables, o = [], 0
    for n in n_pages:
        tables.append(perm[o : o + n])
        o += n
    plan = StepPlan([SeqPlan(t, c - 1, 1) for t, c in zip(tables, ctx)], [0] * b, is_decode=True)
    fb = build_forward_batch(plan, lay, r, dummy_row=10**6, index_dummy_row=10**6, indexer_replicated=False,
                             device=torch.device("cpu"))
    local_pos = lay.local_position_table(r, fb.local_lens, max(fb.max_local_len, 1), PAD_POS)
    scores = torch.full((b, max(fb.max_local_len, 1)), float("-inf"))
    for i in range(b):
        p = local_pos[i, : int(fb.local_lens[i])]
        assert p.tolist() == lay.local_positions(ctx[i], r).tolist()
        scores[i, : len(p)] = full_scores[i][p]
    keys = pack_keys(scores, local_pos)  # PAD_POS past the local lengths: EMPTY_KEY there
    top_keys = select_sharded(ps, keys, k)
    rows, counts = compact_owned(top_keys, fb.block_table, lay, r, k)
    if triton:  # the Triton compaction kernel: the same rows in the same order, the same counts
        t_rows, t_counts = _backend("triton").compact_owned(top_keys, fb.block_table, lay, r, k)
        if not torch.equal(t_rows.long(), rows) or not torch.equal(t_counts.long(), counts.long()):
            return f"triton compact_owned {t_rows.tolist()} / {t_counts.tolist()} != {rows.tolist()} / {counts.tolist()}"
    top = key_positions(top_keys)
    for i, c in enumerate(ctx):
        _, want_top = ordered_topk(full_scores[i].view(1, -1), torch.arange(c).view(1, -1), k)
        want_top = want_top[0, : min(k, c)]
        got_top = top[i][top[i] != PAD_POS]  # the selected set, in any order; the rest is padding
        if sorted(got_top.tolist()) != sorted(want_top.tolist()):
            return f"seq {i} ctx {c} k {k} layout {lay}: got {got_top.tolist()}, want {want_top.tolist()}"
        owned = want_top[lay.owner_of_position(want_top) == r]
        want_rows = lay.local_rows_of_positions(torch.tensor(tables[i]), owned)
        got_rows = rows[i, : int(counts[i])]
        if sorted(got_rows.tolist()) != sorted(want_rows.tolist()):
            return f"seq {i}: compacted rows {got_rows.tolist()} != owned rows {want_rows.tolist()}"
    return None


def _check_gather_prefix(ps, g) -> str | None:
    from dcpserve.attention.dcp import gather_prefix_rows
    from dcpserve.kv.layout import SlotLayout

    d, r = ps.dcp_size, ps.dcp_rank
    inter = [1, 2][int(torch.randint(0, 2, (1,), generator=g))]
    lay = SlotLayout(4, d, inter)
    b = int(torch.randint(1, 5, (1,), generator=g))
    choices = [0, 1, max(d - 1, 0), d, d + 1, int(torch.randint(0, 50, (1,), generator=g))]
    drawn = [choices[int(torch.randint(0, len(choices), (1,), generator=g))] for _ in range(b)]
    # and a batch with no prefix at all (first chunks: the collective is skipped on every rank)
    for starts, dtype in itertools.product((drawn, [0] * b), (torch.float32, torch.uint8)):  # raw bytes too
        width = 3
        fulls = [(torch.arange(s * width).view(s, width) * 7 + i) for i, s in enumerate(starts)]
        fulls = [f.to(dtype) if dtype != torch.uint8 else (f % 251).to(dtype) for f in fulls]
        local = [f[lay.local_positions(s, r)] for f, s in zip(fulls, starts)]
        got = gather_prefix_rows(ps, lay, starts, local, [lay.gather_order(s) for s in starts])
        for i, (f, x) in enumerate(zip(fulls, got)):
            if x.dtype != dtype or not torch.equal(x, f):
                return f"seq {i} start {starts[i]} dtype {dtype}: rows not in global order"
    return None


def _rank_main(rank: int, d: int, init_method: str, outdir: str) -> None:
    from dcpserve.distributed.parallel import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    results: dict[str, list[str]] = {c: [] for c in CHECKS}
    try:
        ps = init_parallel(rank, tp=d, dcp=d, device=torch.device("cpu"), init_method=init_method, timeout_s=TIMEOUT_S)
        assert ps.dcp_rank == rank and ps.dcp_size == d
        for seed in SEEDS:
            # Same generator state on every rank: each check sees identical "global" data everywhere.
            plan = [
                ("gather_heads", lambda g: _check_gather_heads(ps, g)),
                ("merge_a2a", lambda g: _check_merge(ps, g, "a2a")),
                ("merge_ag_rs", lambda g: _check_merge(ps, g, "ag_rs")),
                ("merge_empty_shards", lambda g: _check_merge(ps, g, "a2a", "rank0_empty")
                 or _check_merge(ps, g, "ag_rs", "rank0_empty") or _check_merge(ps, g, "a2a", "all_on_last")
                 or _check_merge(ps, g, "ag_rs", "all_on_last")),
                ("merge_nan_garbage_a2a", lambda g: _check_merge(ps, g, "a2a", "rank0_empty", garbage=True)),
                ("merge_nan_garbage_ag_rs", lambda g: _check_merge(ps, g, "ag_rs", "rank0_empty", garbage=True)),
                ("decode_select_sharded", lambda g: _check_decode_select(ps, g)),
                ("decode_select_one_rank", lambda g: _check_decode_select(ps, g, one_rank=True)),
                ("gather_prefix_rows", lambda g: _check_gather_prefix(ps, g)),
                ("merge_a2a_triton", lambda g: TRITON and (_check_merge(ps, g, "a2a", backend="triton")
                 or _check_merge(ps, g, "a2a", "rank0_empty", garbage=True, backend="triton"))),
                ("decode_select_triton", lambda g: TRITON and _check_decode_select(ps, g, triton=True)),
            ]
            for j, (name, fn) in enumerate(plan):
                g = torch.Generator().manual_seed(1000 * seed + j)
                try:
                    err = fn(g)
                except Exception:  # noqa: BLE001 - recorded and reported by the test
                    err = "exception: " + traceback.format_exc(limit=4)
                if err:
                    results[name].append(f"seed {seed} rank {rank}: {err}")
    except Exception:  # noqa: BLE001
        results["fatal"] = [traceback.format_exc()]
    tmp = os.path.join(outdir, f"rank{rank}.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, os.path.join(outdir, f"rank{rank}.json"))
    # Leave only when every rank has written its results, i.e. has finished every collective: then no peer
    # can still be waiting on this one. os._exit skips the slow interpreter teardown of torch.
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and sum(n.endswith(".json") for n in os.listdir(outdir)) < d:
        time.sleep(0.02)
    destroy_parallel()
    os._exit(0)


# -- the tests (parent process) ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=lambda d: f"d{d}")
def group_results(request, tmp_path_factory):
    d = request.param
    outdir = str(tmp_path_factory.mktemp(f"dcp{d}"))
    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, d, init_method, outdir), daemon=True) for r in range(d)]
    for p in procs:
        p.start()
    deadline = time.time() + 2 * TIMEOUT_S
    for p in procs:
        p.join(max(deadline - time.time(), 0.1))
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in alive:
        procs[i].kill()
        procs[i].join(5)
    assert not alive, f"ranks {alive} hung (d={d})"
    merged: dict[str, list[str]] = {}
    for r in range(d):
        path = os.path.join(outdir, f"rank{r}.json")
        assert os.path.exists(path), f"rank {r} died (exit code {procs[r].exitcode})"
        with open(path) as f:
            for k, v in json.load(f).items():
                merged.setdefault(k, []).extend(v)
    assert not merged.get("fatal"), merged["fatal"][0]
    return merged


def _assert_ok(results, name):
    errs = results[name]
    assert not errs, f"{len(errs)} failures, first: {errs[0]}"


def test_gather_heads_rank_order(group_results):
    _assert_ok(group_results, "gather_heads")


def test_merge_a2a_equals_merge_partials(group_results):
    _assert_ok(group_results, "merge_a2a")


def test_merge_ag_rs_equals_merge_partials(group_results):
    _assert_ok(group_results, "merge_ag_rs")


def test_merge_with_empty_shards(group_results):
    """A rank owning no keys (lse -inf, zero output), or all keys on one rank: both merges stay exact."""
    _assert_ok(group_results, "merge_empty_shards")


def test_merge_a2a_ignores_garbage_of_empty_shards(group_results):
    _assert_ok(group_results, "merge_nan_garbage_a2a")


def test_merge_ag_rs_ignores_garbage_of_empty_shards(group_results):
    _assert_ok(group_results, "merge_nan_garbage_ag_rs")


def test_decode_select_sharded_equals_global_topk(group_results):
    """Random tie-heavy scores, contexts shorter than k and shorter than d: each rank keeps exactly its owned
    members of the single-rank ordered top-min(k, ctx)."""
    _assert_ok(group_results, "decode_select_sharded")


def test_decode_select_sharded_all_on_one_rank(group_results):
    _assert_ok(group_results, "decode_select_one_rank")


def test_gather_prefix_rows_global_order(group_results):
    """Prefix lengths including 0 and fewer than d; float rows and raw byte rows."""
    _assert_ok(group_results, "gather_prefix_rows")


@pytest.mark.skipif(not TRITON, reason="triton not installed")
def test_merge_a2a_with_the_triton_merge_kernel(group_results):
    """The a2a merge through TritonBackend.merge (the LSE-merge kernel), NaN garbage of empty shards included."""
    _assert_ok(group_results, "merge_a2a_triton")


@pytest.mark.skipif(not TRITON, reason="triton not installed")
def test_decode_select_triton_compaction_equals_torch(group_results):
    _assert_ok(group_results, "decode_select_triton")
