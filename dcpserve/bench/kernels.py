"""Attention kernel benchmark (CUDA): correctness at DeepSeek shapes, then timings.

    python -m dcpserve.bench.kernels --out kernels.json [--sweep] [--budget-s 270] [--heads 16,32,64,128 --dense-only]
    python -m dcpserve.bench.kernels --out sparse.json --skip-checks --sparse-only --heads 128,64,32

(a) checks every attention kernel against its torch reference at kv_lora 512, rope 64, 128 query heads,
    bf16 and fp8 (656 B) caches; (b) times with `triton.testing.do_bench` (median, L2 flushed between
    runs): dense paged decode for batch {1, 32, 128} x context {4K, 32K, 128K} (GB/s and % of the measured
    device-to-device copy bandwidth, which counts read + write bytes), sparse decode at batch 128 and 1 with
    k = 2048/d for d in {1, 2, 4} (time, TFLOP/s, GB/s; batch 1 also in a CUDA graph), prefill and the LSE
    merge. `--sweep` then tries a few tile configs on the target shapes (pass the winner back with `--tile`).
    JSON is rewritten after every section so a run cut short still reports what it measured; a time budget
    skips what won't fit.

Expectations, written before measuring (see the kernel docstrings for the arithmetic): with 128 heads one
cached token costs 279 kFLOP, so dense decode is compute-bound (242 FLOP/B bf16, 424 FLOP/B fp8). A bf16
cache at >= 75% of copy bandwidth needs > 500 TFLOP/s of bf16 MMA (H100; more on H200's faster HBM); we
expect Triton to reach 300-450 TFLOP/s, i.e. roughly 45-65% of copy bandwidth on H100, with fp8 giving
lower GB/s at similar TFLOP/s. Sparse decode at k = 2048 should clear 150 TFLOP/s (same tile, ~2 waves).

Measured on H100 80GB HBM3 (copy 3003 GB/s): dense bf16 54-56% of copy bandwidth (392-408 TFLOP/s) at
batch >= 32, ctx >= 32K with the Hopper Gluon kernel (the portable Triton kernel, timed beside it: 35-36%),
fp8 17% (portable); sparse k = 2048 180 TFLOP/s bf16 / 168 fp8 with the portable kernel, 345 / 279 on H200
since sparse decode runs the Hopper kernel too. Why dense still misses 75%: see the
mla_decode_sm90 docstring (the tensor cores idle during the softmax). With fewer heads dense decode is bound
by memory: on H200 the swapped-operand kernel reaches 82-88% of copy bandwidth at 32 heads and 89-96% at 16
(bf16 cache, batch >= 32, ctx >= 32K; `--heads`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from dcpserve.bench.timing import Budget, bench_ms
from dcpserve.kernels._common import default_tile

KV_LORA, ROPE, HEADS, PAGE = 512, 64, 128, 64
SCALE = 192 ** -0.5
FLOP_PER_HEAD_KEY = 2 * (KV_LORA + ROPE) + 2 * KV_LORA  # q.k over 576 dims + p.v over 512


def bench_graph_ms(fn: Callable[[], Any]) -> float | None:
    """Replay time inside a CUDA graph: no Python launch overhead (what graph-captured decode sees).
    L2 is not flushed between replays, so only meaningful where the working set exceeds L2 or as latency."""
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as exc:  # capture can fail on odd setups; the eager number still stands
        print(f"graph timing failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


def row_bytes(fp8: bool) -> int:
    from dcpserve.kernels._common import fp8_row_bytes

    return fp8_row_bytes(KV_LORA, ROPE) if fp8 else (KV_LORA + ROPE) * 2


def make_pool(rows: int, fp8: bool, seed: int = 0) -> torch.Tensor:
    """Random latent pool of `rows` rows, built in chunks so the fp32 staging stays small."""
    from dcpserve.kv.formats import LatentFormat

    torch.manual_seed(seed)
    fmt = LatentFormat(KV_LORA, ROPE, fp8, torch.bfloat16)
    if not fp8:
        return torch.randn(rows, KV_LORA + ROPE, dtype=torch.bfloat16, device="cuda")
    pool = fmt.empty(rows, torch.device("cuda"))
    step = 1 << 20
    for a in range(0, rows, step):
        b = min(rows, a + step)
        pool[a:b] = fmt.encode(torch.randn(b - a, KV_LORA + ROPE, device="cuda"))
    return pool


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(x)):
        return math.inf
    if not fin.any():
        return 0.0
    return float((x[fin] - ref[fin]).abs().max() / ref[fin].abs().max().clamp_min(1e-6))


def check(name: str, got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
          tol: float = 2e-2) -> dict:
    e_out, e_lse = rel_err(got[0], ref[0]), rel_err(got[1], ref[1])
    nan = bool(torch.isnan(got[0]).any() or torch.isnan(got[1]).any())
    res = {"name": name, "out_rel_err": e_out, "lse_rel_err": e_lse, "nan": nan,
           "ok": (e_out <= tol and e_lse <= tol and not nan)}
    print(f"check {name:40s} out {e_out:.2e} lse {e_lse:.2e} {'OK' if res['ok'] else 'FAIL'}", flush=True)
    return res


def run_checks(tiles: dict, page: int) -> list[dict]:
    from dcpserve.kernels.merge import merge_lse, merge_lse_ref
    from dcpserve.kernels.mla_decode import mla_decode, mla_decode_ref
    from dcpserve.kernels.mla_prefill import mla_prefill, mla_prefill_ref
    from dcpserve.kernels.mla_sparse_decode import mla_sparse_decode, mla_sparse_decode_ref

    torch.manual_seed(1)
    out = []
    lens = torch.tensor([4100, 0, 999, 2500, 64], dtype=torch.int32, device="cuda")
    b = lens.shape[0]
    max_pages = 4100 // page + 1
    q = torch.randn(b, HEADS, KV_LORA + ROPE, device="cuda").bfloat16()
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "bf16"
        pool = make_pool(b * max_pages * page, fp8, seed=2)
        bt = torch.randperm(b * max_pages, device="cuda").view(b, max_pages).int()
        ref = mla_decode_ref(q, pool, bt, lens, page, SCALE, KV_LORA, ROPE, fp8)
        for ns in (None, 5):
            got = mla_decode(q, pool, bt, lens, page, SCALE, KV_LORA, ROPE, fp8, num_splits=ns,
                             config=tiles.get(f"dense-{tag}"))
            out.append(check(f"decode {tag} splits={ns} ({decode_kernel(q, pool, fp8, tiles.get(f'dense-{tag}'))})",
                             got, ref))
        if not fp8:  # the portable kernel too, where the Hopper one took the default path
            got = mla_decode(q, pool, bt, lens, page, SCALE, KV_LORA, ROPE, fp8, config=default_tile(HEADS, fp8))
            out.append(check(f"decode {tag} (portable)", got, ref))
        counts = torch.tensor([2048, 0, 777, 1500, 1], dtype=torch.int32, device="cuda")
        rows = torch.full((b, 2048), -1, dtype=torch.int32, device="cuda")
        for i, c in enumerate(counts.tolist()):
            rows[i, :c] = torch.randperm(pool.shape[0], device="cuda")[:c].int()
        ref = mla_sparse_decode_ref(q, pool, rows, counts, SCALE, KV_LORA, ROPE, fp8)
        for ns in (None, 3):
            got = mla_sparse_decode(q, pool, rows, counts, SCALE, KV_LORA, ROPE, fp8, num_splits=ns,
                                    config=tiles.get(f"sparse-{tag}"))
            kernel = decode_kernel(q, pool, fp8, tiles.get(f"sparse-{tag}"))
            out.append(check(f"sparse decode {tag} splits={ns} ({kernel})", got, ref))
        ctx, new = [1000, 300, 77], [64, 300, 0]
        cu_k = torch.tensor([0] + ctx, device="cuda").cumsum(0).int()
        cu_q = torch.tensor([0] + new, device="cuda").cumsum(0).int()
        kv = pool[: int(cu_k[-1])]
        q_pos = torch.cat([torch.arange(c - n, c) for c, n in zip(ctx, new)]).int().to("cuda")
        t = int(cu_q[-1])
        topk = torch.full((t, 512), -1, dtype=torch.int32, device="cuda")
        for i in range(t):
            c = ctx[0] if i < new[0] else ctx[1]
            topk[i, : min(500, c)] = torch.randperm(c, device="cuda")[: min(500, c)].int()
        for h in (16, 128):
            qp = torch.randn(t, h, KV_LORA + ROPE, device="cuda").bfloat16()
            ref = mla_prefill_ref(qp, kv, cu_q, cu_k, q_pos, SCALE, KV_LORA, ROPE, fp8)
            out.append(check(f"prefill {tag} H={h}", mla_prefill(qp, kv, cu_q, cu_k, q_pos, SCALE, KV_LORA, ROPE, fp8), ref))
            ref = mla_prefill_ref(qp, kv, cu_q, cu_k, q_pos, SCALE, KV_LORA, ROPE, fp8, topk_pos=topk)
            got = mla_prefill(qp, kv, cu_q, cu_k, q_pos, SCALE, KV_LORA, ROPE, fp8, topk_pos=topk)
            out.append(check(f"sparse prefill {tag} H={h}", got, ref))
        del pool
    outs = torch.randn(4, 2048, KV_LORA, device="cuda")
    lses = torch.randn(4, 2048, device="cuda") * 3
    lses[0, ::3] = float("-inf")
    lses[:, 5] = float("-inf")
    lses[2, 7] = float("nan")
    out.append(check("merge n=4", merge_lse(outs, lses), merge_lse_ref(outs, lses), tol=1e-5))
    return out


def decode_kernel(q: torch.Tensor, pool: torch.Tensor, fp8: bool, tile) -> str:
    """Which decode kernel runs for these inputs (dense and sparse alike): the Hopper Gluon one or the portable one."""
    from dcpserve.kernels.mla_decode import sm90_kernel

    return "sm90" if tile is None and sm90_kernel(q, pool, KV_LORA, ROPE, fp8) else "portable"


def dense_case(pool: torch.Tensor, fp8: bool, batch: int, ctx: int, tile, page: int, num_splits: int | None = None,
               heads: int = HEADS) -> dict:
    from dcpserve.kernels.mla_decode import mla_decode

    pages = ctx // page
    # Disjoint pages per sequence in shuffled order: every byte is read from HBM, none twice.
    bt = torch.randperm(pool.shape[0] // page, device="cuda")[: batch * pages].view(batch, pages).int()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, KV_LORA + ROPE, device="cuda").bfloat16()
    fn = lambda: mla_decode(q, pool, bt, lens, page, SCALE, KV_LORA, ROPE, fp8, num_splits=num_splits,  # noqa: E731
                            max_len=ctx, config=tile)
    ms = bench_ms(fn)
    nbytes = batch * ctx * row_bytes(fp8)
    flops = batch * heads * ctx * FLOP_PER_HEAD_KEY
    return {"cache": "fp8" if fp8 else "bf16", "kernel": decode_kernel(q, pool, fp8, tile), "heads": heads,
            "batch": batch, "ctx": ctx, "ms": ms,
            "gbps": nbytes / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12,
            "ms_graph": bench_graph_ms(fn) if batch == 1 else None}


def sparse_case(pool: torch.Tensor, fp8: bool, batch: int, k: int, tile, heads: int = HEADS) -> dict:
    from dcpserve.kernels.mla_sparse_decode import mla_sparse_decode

    rows = torch.randint(0, pool.shape[0], (batch, k), dtype=torch.int32, device="cuda")
    counts = torch.full((batch,), k, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, KV_LORA + ROPE, device="cuda").bfloat16()
    fn = lambda: mla_sparse_decode(q, pool, rows, counts, SCALE, KV_LORA, ROPE, fp8, config=tile)  # noqa: E731
    ms = bench_ms(fn)
    flops = batch * heads * k * FLOP_PER_HEAD_KEY
    return {"cache": "fp8" if fp8 else "bf16", "kernel": decode_kernel(q, pool, fp8, tile), "heads": heads,
            "batch": batch, "k": k, "ms": ms,
            "tflops": flops / (ms * 1e-3) / 1e12, "gbps": batch * k * row_bytes(fp8) / (ms * 1e-3) / 1e9,
            "ms_graph": bench_graph_ms(fn) if batch == 1 else None}


SWEEP = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3)]


def prefill_cases(pool: torch.Tensor) -> list[dict]:
    """Dense causal prefill of one sequence: a rank's 16 heads over a 4K prompt, 128 heads over an extend."""
    from dcpserve.kernels.mla_prefill import mla_prefill

    out = []
    for h, n_new, ctx in ((16, 4096, 4096), (128, 1024, 8192)):
        kv = pool[:ctx]
        cu_q = torch.tensor([0, n_new], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, ctx], dtype=torch.int32, device="cuda")
        q_pos = torch.arange(ctx - n_new, ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(n_new, h, KV_LORA + ROPE, device="cuda").bfloat16()
        ms = bench_ms(lambda: mla_prefill(q, kv, cu_q, cu_k, q_pos, SCALE, KV_LORA, ROPE, False, max_q_len=n_new))
        keys = n_new * (ctx - n_new) + n_new * (n_new + 1) // 2
        r = {"heads": h, "new": n_new, "ctx": ctx, "ms": ms, "tflops": keys * h * FLOP_PER_HEAD_KEY / (ms * 1e-3) / 1e12}
        out.append(r)
        print("prefill", r, flush=True)
    return out


def parse_tile(spec: str):
    from dcpserve.kernels._common import TileConfig

    h, n, w, s = (int(x) for x in spec.split(","))
    return TileConfig(block_h=h, block_n=n, num_warps=w, num_stages=s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this long")
    ap.add_argument("--sweep", action="store_true", help="after the table, try tile configs on the target shapes")
    ap.add_argument("--sweep-splits", action="store_true", help="time dense decode at forced split counts")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--heads", type=lambda v: [int(x) for x in v.split(",")], default=[HEADS],
                    help="query heads per rank for the dense table, comma-separated: 128 is a TP4+DCP4 rank of the "
                         "benchmark model (compute-bound), 32 a plain TP4 rank (memory-bound)")
    ap.add_argument("--page-size", type=int, default=PAGE, help="KV rows per page of the decode pools")
    ap.add_argument("--cache", type=lambda v: v.split(","), default=["bf16", "fp8"],
                    help="cache formats to time, comma-separated (bf16, fp8)")
    ap.add_argument("--dense-only", action="store_true", help="only the dense decode table (skip sparse, prefill, merge)")
    ap.add_argument("--sparse-only", action="store_true", help="only the sparse decode table (heads from --heads)")
    ap.add_argument("--tile", action="append", default=[],
                    help="KIND=H,N,WARPS,STAGES with KIND in dense-bf16, dense-fp8, sparse-bf16, sparse-fp8")
    args = ap.parse_args()
    page = args.page_size
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is required")
    budget = Budget(args.budget_s)
    tiles = {kv.split("=")[0]: parse_tile(kv.split("=")[1]) for kv in args.tile}
    props = torch.cuda.get_device_properties(0)
    res: dict[str, Any] = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                           "page_size": page, "checks": [], "sweep": [], "dense": [], "sparse": [], "merge": [],
                           "prefill": []}
    import triton

    res["triton"] = triton.__version__

    def save() -> None:
        res["tiles"] = {k: asdict(v) for k, v in tiles.items()}
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    res["copy_gbps"] = copy_bandwidth_gbps()
    print(f"{props.name}: copy bandwidth {res['copy_gbps']:.0f} GB/s (read+write)", flush=True)
    save()
    if not args.skip_checks:
        t0 = time.time()
        res["checks"] = run_checks(tiles, page)
        res["checks_s"] = time.time() - t0
        save()

    # Largest pool once per cache format; cases index disjoint pages of it.
    for fp8 in [c == "fp8" for c in args.cache]:
        tag = "fp8" if fp8 else "bf16"
        pool = make_pool(128 * 131072, fp8, seed=3)
        dense_shapes = () if args.sparse_only else itertools.product(args.heads, (1, 32, 128), (4096, 32768, 131072))
        for heads, batch, ctx in dense_shapes:
            if budget.left() < 15:
                break
            r = dense_case(pool, fp8, batch, ctx, tiles.get(f"dense-{tag}"), page, heads=heads)
            rows = [r]
            if r["kernel"] == "sm90":  # and the portable kernel on the same shape, for comparison
                rows.append(dense_case(pool, fp8, batch, ctx, default_tile(heads, fp8), page, heads=heads))
            for r in rows:
                r["pct_copy_bw"] = 100 * r["gbps"] / res["copy_gbps"]
                res["dense"].append(r)
                print("dense", r, flush=True)
            save()
        # k = 2048 / d: what one DCP rank attends to per query.
        sparse_shapes = () if args.dense_only else itertools.product(args.heads, (128, 1), (1, 2, 4))
        for heads, batch, d in sparse_shapes:
            if budget.left() < 10:
                break
            r = sparse_case(pool, fp8, batch, 2048 // d, tiles.get(f"sparse-{tag}"), heads)
            rows = [r]
            if r["kernel"] == "sm90":  # and the portable kernel on the same shape
                rows.append(sparse_case(pool, fp8, batch, 2048 // d, default_tile(heads, fp8), heads))
            for r in rows:
                r["dcp"] = d
                res["sparse"].append(r)
                print("sparse", r, flush=True)
            save()
        if not fp8 and not args.dense_only and not args.sparse_only and budget.left() > 20:
            res["prefill"] = prefill_cases(pool)
            save()
        del pool
        torch.cuda.empty_cache()

    if args.sweep:
        for fp8 in (False, True):
            tag = "fp8" if fp8 else "bf16"
            pool = make_pool(32 * 32768 + 4096, fp8, seed=4)
            for kind in ("dense", "sparse"):
                for cfg in SWEEP:
                    if budget.left() < 40:
                        break
                    tile = parse_tile(",".join(map(str, cfg)))
                    t0 = time.time()
                    try:
                        r = dense_case(pool, fp8, 32, 32768, tile, page) if kind == "dense" else sparse_case(pool, fp8, 128, 2048, tile)
                    except Exception as exc:  # out of shared memory / registers: record and go on
                        r = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    r.update(kind=kind, cache=tag, tile=list(cfg), wall_s=time.time() - t0)
                    res["sweep"].append(r)
                    print("sweep", r, flush=True)
                    save()
            del pool
            torch.cuda.empty_cache()

    if args.sweep_splits:
        from dcpserve.kernels._common import choose_num_splits

        pool = make_pool(128 * 4096, False, seed=5)
        for batch, ctx in ((32, 16384), (128, 4096), (1, 131072 // 32)):
            chosen = choose_num_splits(batch, HEADS // 64, ctx, 64, res["sms"])
            for ns in sorted({1, 2, 4, 8, 17, 33, chosen}):
                if budget.left() < 10:
                    break
                r = dense_case(pool, False, batch, ctx, tiles.get("dense-bf16"), page, num_splits=ns)
                r.update(kind="splits", num_splits=ns, chosen=chosen)
                res["sweep"].append(r)
                print(f"splits batch={batch} ctx={ctx} splits={ns}{' (chosen)' if ns == chosen else ''}: "
                      f"{r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s", flush=True)
        del pool
        torch.cuda.empty_cache()
        save()

    from dcpserve.kernels.merge import merge_lse

    for n, m in ((4, 128 * 32), (8, 128 * 128)):
        outs = torch.randn(n, m, KV_LORA, device="cuda")
        lses = torch.randn(n, m, device="cuda")
        ms = bench_ms(lambda: merge_lse(outs, lses))
        r = {"n": n, "rows": m, "v": KV_LORA, "ms": ms, "gbps": (n + 1) * m * KV_LORA * 4 / (ms * 1e-3) / 1e9}
        res["merge"].append(r)
        print("merge", r, flush=True)
    save()
    print_table(res)


def print_table(res: dict) -> None:
    print(f"\n== {res['device']} ({res['sms']} SMs), copy bw {res['copy_gbps']:.0f} GB/s, tiles "
          f"{ {k: v for k, v in res.get('tiles', {}).items()} }")
    bad = [c["name"] for c in res["checks"] if not c["ok"]]
    print(f"checks: {len(res['checks']) - len(bad)}/{len(res['checks'])} ok {bad if bad else ''}")
    print(f"{'dense decode':23s} {'heads':>5s} {'batch':>5s} {'ctx':>7s} {'ms':>9s} {'GB/s':>7s} {'%copy':>6s} {'TFLOP/s':>8s}"
          f" {'graph ms':>9s}")
    for r in res["dense"]:
        g = f"{r['ms_graph']:9.3f}" if r.get("ms_graph") else ""
        print(f"{r['cache'] + ' ' + r.get('kernel', ''):23s} {r.get('heads', HEADS):5d} {r['batch']:5d} {r['ctx']:7d} {r['ms']:9.3f} {r['gbps']:7.0f} "
              f"{r['pct_copy_bw']:6.1f} {r['tflops']:8.1f} {g}")
    print(f"{'sparse decode':14s} {'heads':>5s} {'batch':>5s} {'k':>7s} {'ms':>9s} {'GB/s':>7s} {'TFLOP/s':>8s}"
          f" {'graph ms':>9s}")
    for r in res["sparse"]:
        g = f"{r['ms_graph']:9.3f}" if r.get("ms_graph") else ""
        print(f"{r['cache'] + ' ' + r.get('kernel', ''):14s} {r.get('heads', HEADS):5d} {r['batch']:5d} {r['k']:7d}"
              f" {r['ms']:9.3f} {r['gbps']:7.0f} {r['tflops']:8.1f} {g}")
    for r in res["prefill"]:
        print(f"prefill H={r['heads']} new={r['new']} ctx={r['ctx']}: {r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s")
    for r in res["sweep"]:
        if r.get("kind") == "splits":
            continue
        print(f"sweep {r['kind']:6s} {r['cache']:4s} tile(H,N,warps,stages)={r['tile']}: "
              + (f"{r['ms']:.3f} ms {r['tflops']:.1f} TFLOP/s" if "ms" in r else r.get("error", "")))
    for r in res["merge"]:
        print(f"merge n={r['n']} rows={r['rows']} V={r['v']}: {r['ms'] * 1e3:.1f} us {r['gbps']:.0f} GB/s")


if __name__ == "__main__":
    main()
