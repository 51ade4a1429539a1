"""Benchmark of the prefill/extend MLA kernel (CUDA) at the engine's chunk shapes, with a tile sweep.

    python -m dcpserve.bench.kernels_prefill --out prefill.json [--sweep] [--heads 32,64,128] [--cache bf16,fp8]
    python -m dcpserve.bench.kernels_prefill --out prefill.json --tiny   # CPU dry run (Triton interpreter)

A 4K prompt prefills in two chunks of 2048 tokens (`--chunked-prefill-size 2048`): the first attends causally
over its own 2048 keys ("dense"), the second takes V3.2's sparse path, each query attending its top-2048 of the
4096 positions ("sparse"; random distinct causal positions here, in random order as the indexer returns them).
Heads: 32 is a TP4 rank's share of the benchmark model, 64 a TP2 rank's, 128 TP1 (prefill never gathers heads
across a DCP group). Each case times `mla_prefill` with its default tile (`triton.testing.do_bench`, median, L2
flushed) and reports TFLOP/s (2 * (576 + 512) per query, head and attended key); `--sweep` adds the tiles of
SWEEP and each one's largest difference to the default tile's output. `--tiny` checks the default tiles
against `mla_prefill_ref` at small shapes instead. Ends with a short table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

if not torch.cuda.is_available() and "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dcpserve.kernels._common import TileConfig  # noqa: E402
from dcpserve.kernels.mla_prefill import mla_prefill, mla_prefill_ref, prefill_tile  # noqa: E402
from dcpserve.kv.formats import LatentFormat  # noqa: E402

SCALE = 192 ** -0.5
# (block_h, block_n, num_warps, num_stages); dense tiles take 64 // block_h tokens per program.
SWEEP = [(32, 32, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 1), (64, 64, 8, 2),
         (64, 64, 8, 3), (16, 64, 8, 2)]


def make_chunk(kind: str, heads: int, fp8: bool, chunk: int, kv_lora: int, rope: int, dev: torch.device,
               seed: int = 0) -> dict[str, Any]:
    """Inputs of one prefill chunk: "dense" = the first `chunk` tokens of a prompt, "sparse" = the second,
    every query with `chunk` selected positions among the 2 * chunk causal ones."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ctx = chunk if kind == "dense" else 2 * chunk
    q_pos = torch.arange(ctx - chunk, ctx, dtype=torch.int32)
    topk = None
    if kind == "sparse":
        score = torch.rand(chunk, ctx, generator=g)
        score[torch.arange(ctx)[None, :] > q_pos[:, None].long()] = -1.0  # causal: never pick a later position
        topk = score.topk(chunk, dim=1).indices.int().to(dev)
    kv = LatentFormat(kv_lora, rope, fp8, torch.bfloat16).encode(torch.randn(ctx, kv_lora + rope, generator=g))
    return {"q": torch.randn(chunk, heads, kv_lora + rope, generator=g).bfloat16().to(dev), "kv": kv.to(dev),
            "cu_q": torch.tensor([0, chunk], dtype=torch.int32, device=dev),
            "cu_k": torch.tensor([0, ctx], dtype=torch.int32, device=dev), "q_pos": q_pos.to(dev), "topk": topk,
            "fp8": fp8, "pairs": chunk * chunk if kind == "sparse" else chunk * (chunk + 1) // 2}


def run(c: dict[str, Any], kv_lora: int, rope: int,
        tile: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return mla_prefill(c["q"], c["kv"], c["cu_q"], c["cu_k"], c["q_pos"], SCALE, kv_lora, rope, c["fp8"],
                       topk_pos=c["topk"], max_q_len=c["q"].shape[0], config=tile)


def time_case(kind: str, heads: int, fp8: bool, sweep: bool) -> list[dict[str, Any]]:
    import triton.testing

    c = make_chunk(kind, heads, fp8, 2048, 512, 64, torch.device("cuda"))
    base = run(c, 512, 64)
    flop = c["pairs"] * heads * 2 * (576 + 512)
    rows = []
    for cfg in [None] + (SWEEP if sweep else []):
        tile = None if cfg is None else TileConfig(*cfg)
        r: dict[str, Any] = {"kind": kind, "heads": heads, "cache": "fp8" if fp8 else "bf16",
                             "tile": list(prefill_tile(heads, kind == "sparse", fp8=fp8)) if cfg is None else list(cfg),
                             "default": cfg is None}
        try:
            out = run(c, 512, 64, tile)
            r["max_diff_to_default"] = float((out[0] - base[0]).abs().max())
            r["ms"] = float(triton.testing.do_bench(lambda t=tile: run(c, 512, 64, t), warmup=10, rep=60))
            r["tflops"] = flop / (r["ms"] * 1e-3) / 1e12
        except Exception as exc:  # out of shared memory: record and go on
            r["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        rows.append(r)
        print(r, flush=True)
    return rows


def tiny_checks() -> list[dict[str, Any]]:
    """The engine's two chunk kinds at small shapes against the torch reference: on CPU through the
    interpreter (fp32 dots), on a GPU with bf16 tensor-core dots, whose rounding moves outputs by a few 1e-3
    (H200: at most 7.2e-3 here), hence the looser bound there."""
    rows = []
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tol = 3e-2 if dev.type == "cuda" else 1e-3
    for kind in ("dense", "sparse"):
        for fp8 in (False, True):
            c = make_chunk(kind, 4, fp8, 24, 64, 16, dev, seed=1)
            got = run(c, 64, 16)
            ref = mla_prefill_ref(c["q"], c["kv"], c["cu_q"], c["cu_k"], c["q_pos"], SCALE, 64, 16, fp8,
                                  topk_pos=c["topk"])
            err = max(float((got[0] - ref[0]).abs().max()), float((got[1] - ref[1]).abs().max()))
            rows.append({"kind": kind, "cache": "fp8" if fp8 else "bf16", "max_err": err, "ok": err < tol})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", type=lambda v: [int(x) for x in v.split(",")], default=[32, 64, 128])
    ap.add_argument("--cache", type=lambda v: v.split(","), default=["bf16", "fp8"])
    ap.add_argument("--sweep", action="store_true", help="also time the tiles of SWEEP")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: small shapes against the torch reference")
    ns = ap.parse_args(argv)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if ns.tiny:
        res["checks"] = tiny_checks()
        with open(ns.out, "w") as f:
            json.dump(res, f, indent=1)
        return 0 if all(r["ok"] for r in res["checks"]) else 1
    res["rows"] = []
    for cache in ns.cache:
        for heads in ns.heads:
            for kind in ("dense", "sparse"):
                res["rows"] += time_case(kind, heads, cache == "fp8", ns.sweep)
                with open(ns.out, "w") as f:
                    json.dump(res, f, indent=1)
    print(f"\n{res['device']}: mla_prefill, one 2048-token chunk of a 4K prompt")
    print(f"{'kind':7s}{'cache':>6s}{'heads':>6s}  {'default tile (T,H,N,w,s)':26s}{'ms':>8s}{'TFLOP/s':>9s}"
          f"  {'best tile (H,N,w,s)':20s}{'ms':>8s}{'TFLOP/s':>9s}")
    for cache in ns.cache:
        for heads in ns.heads:
            for kind in ("dense", "sparse"):
                rs = [r for r in res["rows"]
                      if (r["kind"], r["cache"], r["heads"]) == (kind, cache, heads) and "ms" in r]
                if not rs:
                    continue
                d = next(r for r in rs if r["default"])
                b = min(rs, key=lambda r: r["ms"])
                print(f"{kind:7s}{cache:>6s}{heads:6d}  {d['tile']!s:26s}{d['ms']:8.3f}{d['tflops']:9.0f}"
                      f"  {'(default)' if b['default'] else str(b['tile']):20s}{b['ms']:8.3f}{b['tflops']:9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
