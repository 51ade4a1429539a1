"""Benchmark of the block-fp8 weight kernels (CUDA): fp8_linear against cuBLAS on the same weights in bf16,
and the fp8 MoE against the bf16 MoE, at DeepSeek-V3.2's layer shapes.

    python -m dcpserve.bench.kernels_fp8 --out fp8.json [--no-sweep]
    python -m dcpserve.bench.kernels_fp8 --out fp8.json --quick  # 4 large matrices, decode batches, graphs only
    python -m dcpserve.bench.kernels_fp8 --out fp8.json --tiny   # CPU dry run (Triton interpreter)

linear  every layer matrix of V3.2 at tp 1 (and the sharded ones at tp 4), M rows in {1, 4, 32, 128, 512, 2048}:
        max error of fp8_linear vs fp8_linear_ref, time of both (L2 flushed; CUDA-graph replay for M <= 32,
        where a decode step runs them), GB/s of weight bytes read (1 B per element for fp8, 2 for bf16);
        at M = 1 a sweep of tile configurations.
moe     hidden 7168, I = 2048/tp, E 256, top-8: fused_moe with e4m3 experts vs bf16 experts, T in {1, 32, 128, 1024}.
Ends with a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available() and "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dcpserve.bench.timing import bench_ms  # noqa: E402
from dcpserve.kernels.fp8_linear import (  # noqa: E402
    DEQUANT_MIN_M, Fp8GemmConfig, default_config, dequant_fp8, fp8_linear, fp8_linear_ref)
from dcpserve.kernels.moe import MoEScales, fused_moe  # noqa: E402
from dcpserve.loader.fp8 import quantize_block  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
BLOCK = (128, 128)

# (name, N out, K in) of V3.2's layer matrices; "/4": the tp=4 shard.
SHAPES = [("q_a", 1536, 7168), ("kv_a", 576, 7168), ("q_b", 24576, 1536), ("o_proj", 7168, 16384),
          ("idx_wq_b", 8192, 1536), ("idx_wk", 128, 7168), ("gate|up", 18432, 7168), ("down", 7168, 18432),
          ("q_b/4", 6144, 1536), ("o_proj/4", 7168, 4096), ("gate|up/4", 4608, 7168), ("down/4", 7168, 4608)]
TINY_SHAPES = [("a", 40, 96), ("b", 130, 300)]


def log(msg: str) -> None:
    print(msg, flush=True)


def graph_ms(fn: Callable[[], Any]) -> float | None:
    if not CUDA:
        return None
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))


def _sweep_configs() -> list[Fp8GemmConfig]:
    return [Fp8GemmConfig(16, bn, 128, split, 4, stages) for bn in (32, 64, 128) for split in (1, 0)
            for stages in (3, 5)]


def bench_linear(shapes: list[tuple[str, int, int]], ms_rows: list[int], sweep: bool, res: list[dict]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, n, k in shapes:
        w = torch.randn(n, k, device=DEV, generator=gen) * k ** -0.5
        fw = quantize_block(w, BLOCK if CUDA else (32, 32))
        q, s, blk = fw.q, fw.scale, fw.block
        wb = dequant_fp8(q, s, blk, torch.bfloat16 if CUDA else torch.float32)
        for m in ms_rows:
            x = torch.randn(m, k, device=DEV, generator=gen).to(wb.dtype)
            out, ref = fp8_linear(x, q, s, blk), fp8_linear_ref(x, q, s, blk)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            t8 = bench_ms(lambda: fp8_linear(x, q, s, blk))
            t16 = bench_ms(lambda: F.linear(x, wb))
            r = {"name": name, "N": n, "K": k, "M": m, "rel_err": err, "fp8_ms": t8, "bf16_ms": t16,
                 "fp8_gbps": n * k / t8 / 1e6, "bf16_gbps": 2 * n * k / t16 / 1e6}
            if m > DEQUANT_MIN_M:  # what the tensor-core kernel would take here
                cfg = default_config(m, n, k, blk[1], DEV, x.element_size())
                r["dot_ms"] = bench_ms(lambda: fp8_linear(x, q, s, blk, cfg))
            if m > 1:  # the other path for this M: dequantize to bf16, then cuBLAS
                r["dequant_cublas_ms"] = bench_ms(lambda: F.linear(x, dequant_fp8(q, s, blk, wb.dtype)))
            if m <= 32:
                r["fp8_graph_ms"] = graph_ms(lambda: fp8_linear(x, q, s, blk))
                r["bf16_graph_ms"] = graph_ms(lambda: F.linear(x, wb))
                r["config"] = str(default_config(m, n, k, blk[1], DEV, x.element_size()))
            if sweep and CUDA and m == 1 and name in ("q_a", "o_proj", "gate|up", "o_proj/4"):
                r["sweep"] = []
                for c in _sweep_configs():
                    auto = default_config(m, n, k, blk[1], DEV, 2)
                    c = Fp8GemmConfig(c.block_m, c.block_n, c.block_k, c.split_k or auto.split_k, c.num_warps,
                                      c.num_stages)
                    r["sweep"].append({"config": str(c), "graph_ms": graph_ms(lambda c=c: fp8_linear(x, q, s, blk, c))})
            res.append(r)
            g = ""
            if r.get("fp8_graph_ms"):
                g = f" graph fp8 {r['fp8_graph_ms'] * 1e3:7.1f} us bf16 {r['bf16_graph_ms'] * 1e3:7.1f} us"
            dq = f" dequant+cuBLAS {r['dequant_cublas_ms'] * 1e3:8.1f} us" if "dequant_cublas_ms" in r else ""
            dq += f" dot {r['dot_ms'] * 1e3:8.1f} us" if "dot_ms" in r else ""
            log(f"  {name:10s} {n:6d}x{k:6d} M={m:5d}: fp8 {t8 * 1e3:8.1f} us ({r['fp8_gbps']:6.0f} GB/s) "
                f"bf16 {t16 * 1e3:8.1f} us ({r['bf16_gbps']:6.0f} GB/s){dq}{g} err {err:.1e}")
            if r.get("sweep"):
                best = min(r["sweep"], key=lambda z: z["graph_ms"] or 1e9)
                log(f"    best of sweep: {best['config']} {best['graph_ms'] * 1e3:.1f} us")


def bench_moe(tps: list[int], ts: list[int], hidden: int, inter_full: int, experts: int, topk: int,
              res: list[dict]) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    blk = BLOCK if CUDA else (32, 32)
    dtype = torch.bfloat16 if CUDA else torch.float32
    for tp in tps:
        inter = inter_full // tp
        mats = [[quantize_block(torch.randn(r, c, device=DEV, generator=gen) * c ** -0.5, blk)
                 for r, c in ((inter, hidden), (inter, hidden), (hidden, inter))] for _ in range(experts)]
        w13 = torch.stack([torch.cat([g.q, u.q]) for g, u, _ in mats])
        w2 = torch.stack([d.q for _, _, d in mats])
        sc = MoEScales(torch.stack([torch.cat([g.scale, u.scale]) for g, u, _ in mats]),
                       torch.stack([d.scale for _, _, d in mats]), blk)
        d13 = torch.stack([torch.cat([dequant_fp8(g.q, g.scale, blk, dtype), dequant_fp8(u.q, u.scale, blk, dtype)])
                           for g, u, _ in mats])
        d2 = torch.stack([dequant_fp8(d.q, d.scale, blk, dtype) for _, _, d in mats])
        for t in ts:
            x = torch.randn(t, hidden, device=DEV, generator=gen).to(dtype)
            ids = torch.rand(t, experts, device=DEV, generator=gen).argsort(dim=1)[:, :topk]
            wts = torch.rand(t, topk, device=DEV, generator=gen) + 0.05
            out8 = fused_moe(x, w13, w2, wts, ids, scales=sc)
            out16 = fused_moe(x, d13, d2, wts, ids)
            err = ((out8.float() - out16.float()).abs().max() / out16.float().abs().max()).item()
            t8 = bench_ms(lambda: fused_moe(x, w13, w2, wts, ids, scales=sc))
            t16 = bench_ms(lambda: fused_moe(x, d13, d2, wts, ids))
            r = {"tp": tp, "T": t, "fp8_ms": t8, "bf16_ms": t16, "rel_err_vs_bf16": err}
            if t <= 32:
                r["fp8_graph_ms"] = graph_ms(lambda: fused_moe(x, w13, w2, wts, ids, scales=sc))
                r["bf16_graph_ms"] = graph_ms(lambda: fused_moe(x, d13, d2, wts, ids))
            res.append(r)
            log(f"  moe tp={tp} T={t:5d}: fp8 {t8 * 1e3:8.1f} us bf16 {t16 * 1e3:8.1f} us "
                f"({t16 / t8:4.2f}x) err {err:.1e}")


def bench_quick(res: list[dict]) -> None:
    """CUDA-graph replay of fp8_linear against cuBLAS on the same weights in bf16, decode-sized M."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name, n, k in [sh for sh in SHAPES if sh[0] in ("gate|up", "o_proj", "o_proj/4", "q_b")]:
        w = quantize_block(torch.randn(n, k, device=DEV, generator=gen) * k ** -0.5, BLOCK)
        wb = dequant_fp8(w.q, w.scale, BLOCK, torch.bfloat16)
        for m in (1, 2, 16, 32, 64, 128):
            x = torch.randn(m, k, device=DEV, generator=gen).to(torch.bfloat16)
            ref = fp8_linear_ref(x, w.q, w.scale, BLOCK).float()
            err = ((fp8_linear(x, w.q, w.scale, BLOCK).float() - ref).abs().max() / ref.abs().max()).item()
            t8 = graph_ms(lambda: fp8_linear(x, w.q, w.scale, BLOCK))
            t16 = graph_ms(lambda: F.linear(x, wb))
            res.append({"name": name, "N": n, "K": k, "M": m, "fp8_graph_ms": t8, "bf16_graph_ms": t16, "rel_err": err})
            log(f"  {name:9s} M={m:4d} fp8 {t8 * 1e3:7.1f} us  bf16 cuBLAS {t16 * 1e3:7.1f} us  ({t16 / t8:4.2f}x)  "
                f"err {err:.1e}")


def _table(result: dict) -> str:
    lines = ["", f"== fp8 weight kernels on {result['device']} (graph-replay us where M <= 32, else eager) =="]
    for r in result["linear"]:
        if r["M"] in (1, 32, 128, 2048):
            g8, g16 = r.get("fp8_graph_ms") or r["fp8_ms"], r.get("bf16_graph_ms") or r["bf16_ms"]
            lines.append(f"{r['name']:10s} M={r['M']:5d} fp8 {g8 * 1e3:8.1f} bf16 {g16 * 1e3:8.1f} "
                         f"speedup {g16 / g8:4.2f}x  fp8 {r['N'] * r['K'] / g8 / 1e6:6.0f} GB/s")
    for r in result["moe"]:
        g8, g16 = r.get("fp8_graph_ms") or r["fp8_ms"], r.get("bf16_graph_ms") or r["bf16_ms"]
        lines.append(f"moe tp={r['tp']} T={r['T']:5d} fp8 {g8 * 1e3:8.1f} bf16 {g16 * 1e3:8.1f} speedup {g16 / g8:4.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run of this script)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--quick", action="store_true", help="only the decode-batch table of 4 large matrices")
    args = ap.parse_args(argv)
    if not CUDA and not args.tiny:
        sys.exit("kernels_fp8 needs CUDA (or --tiny for a CPU dry run)")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
                              "torch": torch.__version__, "linear": [], "moe": []}
    if args.quick and CUDA:
        result["quick"] = []
        bench_quick(result["quick"])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    log("== linear")
    bench_linear(TINY_SHAPES if args.tiny else SHAPES, [1, 5] if args.tiny else [1, 4, 16, 32, 128, 256, 512, 2048],
                 not args.no_sweep, result["linear"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    log("== moe")
    if args.skip_moe:
        pass
    elif args.tiny:
        bench_moe([1], [1, 5], 64, 64, 8, 2, result["moe"])
    else:
        bench_moe([1, 4], [1, 32, 128, 1024], 7168, 2048, 256, 8, result["moe"])
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(_table(result), flush=True)


if __name__ == "__main__":
    main()
