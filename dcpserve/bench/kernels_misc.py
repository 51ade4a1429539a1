"""Benchmark of the indexer, top-k, KV-write and MoE kernels (CUDA): correctness at real shapes, then timings.

    python -m dcpserve.bench.kernels_misc --out misc.json [--no-sweep] [--budget-s 240]
    python -m dcpserve.bench.kernels_misc --out misc.json --tiny   # CPU dry run (Triton interpreter)

Sections (JSON rewritten after each, so a run cut short still reports what it measured):
  kv_write  write_latent (fp8 656 B and bf16) and write_index_keys (fp8 132 B), T in {1, 64, 1024, 8192}:
            bytes vs the torch reference and vs formats.encode on CPU (must be identical), GB/s.
  indexer   Hi 64, Di 128, fp8 cache, page 64, batch {1, 32, 128} x context {4K, 32K, 128K}: max error
            vs indexer_scores_ref on a few sequences, a ragged batch (lens 0, page edges), time, GB/s of
            the 132 B rows, TFLOP/s; a small tile sweep.
  topk      packed_topk vs ordered_topk (two stable sorts), k = 2048: identical output, time of both.
  moe       hidden 7168, I = 2048/tp for tp in {1, 4}, E 256, k 8, T in {1, 32, 128, 1024}, bf16: error
            vs the fp32 reference and vs the engine's per-expert loop (experts_loop), time of both,
            TFLOP/s, GB/s of the expert weights touched; CUDA-graph replay time for small T.
Ends with a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import torch

from dcpserve.bench.timing import Budget, bench_ms

if not torch.cuda.is_available() and "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dcpserve.attention.topk import ordered_topk, packed_topk  # noqa: E402
from dcpserve.kernels.indexer import indexer_scores, indexer_scores_ref  # noqa: E402
from dcpserve.kernels.kv_write import (  # noqa: E402
    write_index_keys,
    write_index_keys_ref,
    write_latent,
    write_latent_ref,
)
from dcpserve.kernels.moe import MoEConfig, default_config, fused_moe, fused_moe_ref  # noqa: E402
from dcpserve.kv.formats import IndexKeyFormat, LatentFormat  # noqa: E402
from dcpserve.model.moe import experts_loop  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


def graph_ms(fn: Callable[[], Any]) -> float | None:
    """CUDA-graph replay time (no Python launch overhead); also proves the call captures (no host sync)."""
    if not CUDA:
        return None
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as exc:
        print(f"  graph capture failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- KV write
def bench_kv_write(sizes: list[int], res: list[dict]) -> None:
    n_rows = max(sizes) * 2 + 1
    gen = torch.Generator(device=DEV).manual_seed(0)
    for t in sizes:
        for kind in ("latent_fp8", "latent_bf16", "index_fp8"):
            width, fp8 = (576, kind != "latent_bf16") if kind != "index_fp8" else (128, True)
            fmt = (LatentFormat(512, 64, fp8, torch.bfloat16) if kind != "index_fp8"
                   else IndexKeyFormat(128, True, torch.bfloat16))
            x = (torch.randn(t, width, device=DEV, generator=gen)
                 * 10 ** (torch.rand(t, 1, device=DEV, generator=gen) * 4 - 2)).to(torch.bfloat16)
            rows = torch.randperm(n_rows - 1, device=DEV, generator=gen)[:t]
            rows[3::7] = n_rows - 1  # tokens another DCP rank owns go to the dummy row
            cache, ref = fmt.empty(n_rows, DEV), fmt.empty(n_rows, DEV)

            def run(c: torch.Tensor = cache) -> None:
                if kind == "index_fp8":
                    write_index_keys(c, rows, x, True)
                else:
                    write_latent(c, rows, x, fp8, 512, 64)

            run()
            if kind == "index_fp8":
                write_index_keys_ref(ref, rows, x, True)
            else:
                write_latent_ref(ref, rows, x, fp8, 512, 64)
            owned = rows != n_rows - 1
            mine = cache[rows[owned]].view(torch.uint8)
            bad_ref = int((mine != ref[rows[owned]].view(torch.uint8)).sum())
            bad_cpu = int((mine.cpu() != fmt.encode(x[owned].cpu()).view(torch.uint8)).sum())
            bad_dev = int((mine != fmt.encode(x[owned]).view(torch.uint8)).sum())
            ms = bench_ms(run)
            nbytes = t * (width * 2 + fmt.row_bytes + 8)
            r = dict(kind=kind, T=t, ms=ms, gbps=nbytes / ms / 1e6, mismatched_bytes_vs_ref=bad_ref,
                     mismatched_bytes_vs_encode_cpu=bad_cpu, mismatched_bytes_vs_encode_same_device=bad_dev)
            if t <= 64:
                r["graph_ms"] = graph_ms(run)
            res.append(r)
            log(f"  kv_write {kind:12s} T={t:5d} {ms * 1e3:8.1f} us {r['gbps']:7.1f} GB/s "
                f"bad(ref/cpu-encode/dev-encode)={bad_ref}/{bad_cpu}/{bad_dev}")


# ------------------------------------------------------------------------------------------------ indexer
def _index_case(b: int, ctx: int, page: int, gen: torch.Generator) -> dict:
    """fp8 132 B cache with random non-NaN e4m3 bytes and positive scales; pages shuffled over sequences."""
    pps = -(-ctx // page)
    n_pages = b * pps + 1
    cache = torch.randint(0, 256, (n_pages * page, 132), dtype=torch.uint8, device=DEV, generator=gen)
    cache[:, :128][(cache[:, :128] & 0x7F) == 0x7F] = 0  # drop the e4m3 NaN codes
    cache[:, 128:] = (torch.rand(n_pages * page, 1, device=DEV, generator=gen) * 0.01 + 1e-3).view(torch.uint8)
    bt = torch.randperm(n_pages, device=DEV, generator=gen)[: b * pps].view(b, pps).to(torch.int32)
    q = torch.randn(b, 64, 128, device=DEV, generator=gen).to(torch.bfloat16)
    w = torch.randn(b, 64, device=DEV, generator=gen) * 64 ** -0.5 * 128 ** -0.5
    lens = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    return dict(q=q, w=w, cache=cache, block_table=bt, lens=lens, page_size=page, scale=128 ** -0.5, fp8=True)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    live = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(out), live):
        return float("inf")
    if not live.any():
        return 0.0
    return float((out[live] - ref[live]).abs().max() / ref[live].abs().max().clamp_min(1e-30))


def _check_sub(c: dict, out: torch.Tensor, rows: list[int], max_len: int) -> float:
    sub = {k: (v[rows] if k in ("q", "w", "block_table", "lens") else v) for k, v in c.items()}
    return _rel_err(out[rows], indexer_scores_ref(**sub, max_len=max_len))


def bench_indexer(batches: list[int], ctxs: list[int], page: int, sweep: bool, res: dict) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    # Ragged correctness: empty, single-token, page-edge and odd lengths in one batch.
    lmax = max(ctxs)
    c = _index_case(8, lmax, page, gen)
    c["lens"] = torch.tensor([0, 1, page - 1, page, page + 1, lmax // 3 + 5, lmax - 1, lmax],
                             dtype=torch.int32, device=DEV)
    out = indexer_scores(**c, max_len=lmax)
    res["ragged_rel_err"] = _check_sub(c, out, list(range(8)), lmax)
    log(f"  indexer ragged batch rel err {res['ragged_rel_err']:.2e}")
    res["cases"] = []
    for b in batches:
        for ctx in ctxs:
            c = _index_case(b, ctx, page, gen)
            out = indexer_scores(**c, max_len=ctx)
            err = _check_sub(c, out, [0, b - 1] if b > 1 else [0], ctx)
            ms = bench_ms(lambda: indexer_scores(**c, max_len=ctx))
            toks = b * ctx
            r = dict(batch=b, ctx=ctx, ms=ms, rel_err=err, gbps=toks * 132 / ms / 1e6,
                     tflops=toks * 2 * 64 * 128 / ms / 1e9)
            if b == 1:
                r["graph_ms"] = graph_ms(lambda: indexer_scores(**c, max_len=ctx))
            res["cases"].append(r)
            log(f"  indexer B={b:4d} ctx={ctx:7d} {ms * 1e3:9.1f} us {r['gbps']:7.1f} GB/s "
                f"{r['tflops']:6.1f} TFLOP/s rel_err {err:.1e}")
            del c, out
    if sweep and CUDA:
        # Both MMA operand orders and tile shapes; swap_ab=True (keys as the register operand), 128 keys and
        # 4 warps won on H200 (2026-11-28) and are indexer_scores' defaults.
        res["sweep"] = []
        for b, ctx in ((32, 32768), (1, 131072)):
            c = _index_case(b, ctx, page, gen)
            ref_out = indexer_scores(**c, max_len=ctx)
            for swap in (False, True):
                for bn in (64, 128):
                    for nw in (4, 8):
                        kw = dict(max_len=ctx, block_n=bn, num_warps=nw, swap_ab=swap)
                        err = _rel_err(indexer_scores(**c, **kw), ref_out)
                        ms = bench_ms(lambda: indexer_scores(**c, **kw))
                        res["sweep"].append(dict(batch=b, ctx=ctx, block_n=bn, num_warps=nw, swap_ab=swap, ms=ms,
                                                 gbps=b * ctx * 132 / ms / 1e6, rel_err_vs_default=err))
                        log(f"  indexer sweep B={b} ctx={ctx} swap_ab={swap} block_n={bn} warps={nw}: "
                            f"{ms * 1e3:.1f} us {res['sweep'][-1]['gbps']:.0f} GB/s (vs default {err:.1e})")
            del c, ref_out


# -------------------------------------------------------------------------------------------------- top-k
def bench_topk(batches: list[int], ns: list[int], k: int, res: list[dict]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(2)
    for b in batches:
        for n in ns:
            # Integer-valued scores: heavy ties, so the position tie-break decides much of the set.
            s = torch.randint(-500, 500, (b, n), device=DEV, generator=gen).float()
            s[:, ::11] = float("-inf")
            p = torch.arange(n, device=DEV).expand(b, n).contiguous()
            got = packed_topk(s, p, k)
            want = ordered_topk(s, p, k)
            same = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            ms = bench_ms(lambda: packed_topk(s, p, k))
            ms_ref = bench_ms(lambda: ordered_topk(s, p, k))
            r = dict(batch=b, n=n, k=k, identical=same, ms=ms, ms_two_sorts=ms_ref)
            if b == 1:
                r["graph_ms"] = graph_ms(lambda: packed_topk(s, p, k))
            res.append(r)
            log(f"  topk B={b:4d} n={n:7d} k={k}: {ms * 1e3:8.1f} us (two sorts {ms_ref * 1e3:8.1f} us) "
                f"identical={same}")


# ---------------------------------------------------------------------------------------------------- MoE
def _moe_sweep_configs(t: int) -> list[MoEConfig]:
    if t <= 32:
        return [MoEConfig(16, 64, 128, 128, 4, 4), MoEConfig(16, 32, 64, 256, 4, 3)]
    # The default above 16 pairs per expert is MoEConfig(64, 64, 128, 64, 8, 4); the former BLOCK_M 32 default:
    return [MoEConfig(32, 64, 64, 128, 4, 4), MoEConfig(32, 64, 128, 128, 4, 4)]


def bench_moe(tps: list[int], ts: list[int], hidden: int, inter_full: int, experts: int, topk: int,
              sweep: bool, budget: Budget, res: list[dict]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(3)
    for tp in tps:
        inter = inter_full // tp
        w13 = (torch.randn(experts, 2 * inter, hidden, device=DEV, generator=gen, dtype=torch.bfloat16)
               * hidden ** -0.5)
        w2 = torch.randn(experts, hidden, inter, device=DEV, generator=gen, dtype=torch.bfloat16) * inter ** -0.5
        for t in ts:
            if budget.left() < 20:
                log(f"  moe tp={tp} T={t}: skipped (time budget)")
                continue
            x = torch.randn(t, hidden, device=DEV, generator=gen, dtype=torch.bfloat16)
            ids = torch.rand(t, experts, device=DEV, generator=gen).argsort(dim=1)[:, :topk]
            wts = torch.rand(t, topk, device=DEV, generator=gen) + 0.05
            wts = wts / wts.sum(-1, keepdim=True) * 2.5
            out = fused_moe(x, w13, w2, wts, ids)
            ref = fused_moe_ref(x, w13, w2, wts, ids).float()
            naive_out = experts_loop(x, w13, w2, wts, ids)
            scale = ref.abs().max().item()
            err = (out.float() - ref).abs().max().item() / scale
            err_naive = (naive_out.float() - ref).abs().max().item() / scale
            ms = bench_ms(lambda: fused_moe(x, w13, w2, wts, ids))
            ms_naive = bench_ms(lambda: experts_loop(x, w13, w2, wts, ids))
            n_exp = int(torch.unique(ids).numel())
            wbytes = n_exp * 3 * inter * hidden * 2
            flops = 2 * t * topk * 3 * inter * hidden
            cfg = default_config(t * topk, experts, inter, hidden, DEV)
            r = dict(tp=tp, T=t, inter=inter, ms=ms, ms_naive=ms_naive, rel_err=err, rel_err_naive=err_naive,
                     experts_touched=n_exp, tflops=flops / ms / 1e9, weight_gbps=wbytes / ms / 1e6,
                     config=vars(cfg) if hasattr(cfg, "__dict__") else str(cfg))
            if t <= 32:
                r["graph_ms"] = graph_ms(lambda: fused_moe(x, w13, w2, wts, ids))
            if sweep and CUDA and tp == 1 and t in (1, 1024):
                r["sweep"] = []
                for alt in _moe_sweep_configs(t):
                    a_ms = bench_ms(lambda: fused_moe(x, w13, w2, wts, ids, config=alt))
                    r["sweep"].append(dict(config=str(alt), ms=a_ms, weight_gbps=wbytes / a_ms / 1e6))
                    log(f"    sweep {alt}: {a_ms * 1e3:.1f} us {wbytes / a_ms / 1e6:.0f} GB/s")
            res.append(r)
            g = f" graph {r['graph_ms'] * 1e3:.1f} us" if r.get("graph_ms") else ""
            log(f"  moe tp={tp} T={t:5d}: {ms * 1e3:9.1f} us{g} (naive loop {ms_naive * 1e3:9.1f} us, "
                f"{ms_naive / ms:5.1f}x) {r['tflops']:6.1f} TFLOP/s {r['weight_gbps']:7.1f} GB/s "
                f"err {err:.1e} (naive {err_naive:.1e})")
            del x, out, ref, naive_out
        del w13, w2
        if CUDA:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- driver
def _table(result: dict) -> str:
    lines = ["", f"== kernels_misc on {result['device']} =="]
    for r in result.get("kv_write", []):
        if r["T"] in (64, 8192):
            lines.append(f"kv_write {r['kind']:12s} T={r['T']:5d} {r['ms'] * 1e3:8.1f} us {r['gbps']:7.1f} GB/s "
                         f"bytes!=encode {r['mismatched_bytes_vs_encode_cpu']}")
    for r in result.get("indexer", {}).get("cases", []):
        lines.append(f"indexer  B={r['batch']:4d} ctx={r['ctx']:7d} {r['ms'] * 1e3:9.1f} us {r['gbps']:7.1f} GB/s "
                     f"{r['tflops']:6.1f} TFLOP/s")
    for r in result.get("topk", []):
        lines.append(f"topk     B={r['batch']:4d} n={r['n']:7d} {r['ms'] * 1e3:8.1f} us vs sorts "
                     f"{r['ms_two_sorts'] * 1e3:8.1f} us identical={r['identical']}")
    for r in result.get("moe", []):
        lines.append(f"moe tp={r['tp']} T={r['T']:5d} {r['ms'] * 1e3:9.1f} us naive {r['ms_naive'] * 1e3:9.1f} us "
                     f"{r['tflops']:6.1f} TFLOP/s {r['weight_gbps']:7.1f} GB/s err {r['rel_err']:.1e}")
    return "\n".join(lines)


def _sections(tiny: bool, sweep: bool, budget: Budget, result: dict) -> dict[str, Callable[[], None]]:
    return {
        "kv_write": lambda: bench_kv_write([1, 7] if tiny else [1, 64, 1024, 8192], result["kv_write"]),
        "indexer": lambda: bench_indexer([1, 2] if tiny else [1, 32, 128], [80] if tiny else [4096, 32768, 131072],
                                         16 if tiny else 64, sweep, result["indexer"]),
        "topk": lambda: bench_topk([1, 2] if tiny else [1, 128], [300] if tiny else [32768, 131072],
                                   16 if tiny else 2048, result["topk"]),
        "moe": lambda: bench_moe([1, 4], [1, 5] if tiny else [1, 32, 128, 1024], 64 if tiny else 7168,
                                 128 if tiny else 2048, 8 if tiny else 256, 2 if tiny else 8, sweep, budget,
                                 result["moe"]),
    }


def _run_section(key: str, args: argparse.Namespace, budget: Budget, result: dict) -> None:
    """In this process: run one section, record its numbers or its error."""
    result[key] = {} if key == "indexer" else []
    fn = _sections(args.tiny, not args.no_sweep, budget, result)[key]
    t0 = time.time()
    try:
        fn()
    except Exception as exc:  # keep the other sections' numbers
        import traceback

        traceback.print_exc()
        result[f"{key}_error"] = f"{type(exc).__name__}: {exc}"
    log(f"   {key} took {time.time() - t0:.1f} s")


def _run_isolated(key: str, args: argparse.Namespace, budget: Budget, result: dict) -> None:
    """Each section in its own process: a kernel fault poisons the CUDA context, not the other sections."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{key}.json")
        cmd = [sys.executable, "-m", "dcpserve.bench.kernels_misc", "--out", out, "--section", key,
               "--budget-s", f"{budget.left():.0f}"] + (["--tiny"] if args.tiny else []) \
            + (["--no-sweep"] if args.no_sweep else [])
        try:
            rc = subprocess.run(cmd, timeout=max(budget.left() + 10, 10)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if os.path.exists(out):
            with open(out) as f:
                part = json.load(f)
            result.update({k: v for k, v in part.items() if k.startswith(key)})
        if rc != 0:
            result[f"{key}_error"] = result.get(f"{key}_error", f"section process ended with {rc}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run of this script)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--section", choices=["kv_write", "indexer", "topk", "moe"],
                    help="run one section in this process (the default runs each in its own process)")
    args = ap.parse_args(argv)
    if not CUDA and not args.tiny:
        sys.exit("kernels_misc needs CUDA (or --tiny for a CPU dry run)")
    budget = Budget(args.budget_s)
    name = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)"
    result: dict[str, Any] = dict(device=name, torch=torch.__version__)

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.section:
        _run_section(args.section, args, budget, result)
        save()
        return
    for key in ("kv_write", "indexer", "topk", "moe"):
        if budget.left() < 15:
            log(f"{key}: skipped (time budget)")
            result[key] = {} if key == "indexer" else []
            continue
        log(f"== {key} ({budget.left():.0f} s left)")
        _run_isolated(key, args, budget, result)
        save()
    print(_table(result), flush=True)
    save()


if __name__ == "__main__":
    main()
