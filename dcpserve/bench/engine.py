"""Offline engine benchmark (no HTTP): TTFT, TPOT and tokens/s for fixed input/output lengths, for several
DCP sizes in turn, plus a greedy-token check across configurations.

  python -m dcpserve.bench.engine --model-path builtin:deepseek-v3.2 --load-format dummy --num-layers 4 \\
      --tp 4 --dcp 1,2,4 --batch 1 --input-len 4096 --output-len 1536 --attention-backend triton --out r.json

Prints a table last and writes JSON. `--compare` runs extra configurations (e.g. the torch backend, eager
mode) and reports whether their greedy tokens equal the first configuration's.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from dcpserve.config import EngineArgs
from dcpserve.engine.llm_engine import LLMEngine
from dcpserve.engine.sampler import SamplingParams


@dataclass
class Result:
    label: str
    tp: int
    dcp: int
    batch: int
    input_len: int
    output_len: int
    ttft_ms: float
    tpot_ms: float
    decode_tok_s: float
    total_s: float
    num_layers: int
    kv_tokens: int
    output_ids: list[list[int]]


def prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, input_len), generator=g).tolist()


def run_one(args: EngineArgs, label: str, batch: int, input_len: int, output_len: int, seed: int,
            warmup: bool = True) -> Result:
    eng = LLMEngine(args)
    try:
        ps = prompts(batch, input_len, eng.cfg.vocab_size, seed)
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        if warmup:  # compiles kernels and captures the decode graphs this run will use
            for i, p in enumerate(ps):
                eng.add_request(f"w{i}", p, SamplingParams(max_tokens=min(output_len, 8), ignore_eos=True))
            while eng.has_unfinished():
                eng.step()
        t0 = time.perf_counter()
        for i, p in enumerate(ps):
            eng.add_request(str(i), p, params)
        first: dict[str, float] = {}
        outs: dict[str, list[int]] = {str(i): [] for i in range(batch)}
        while eng.has_unfinished():
            for o in eng.step():
                outs[o.req_id] += o.new_token_ids
                first.setdefault(o.req_id, time.perf_counter())
        t1 = time.perf_counter()
        ttft = max(first.values()) - t0  # the batch's prefill is done when the last first token arrives
        tpot = (t1 - t0 - ttft) / max(output_len - 1, 1)
        return Result(label, args.tp, args.dcp, batch, input_len, output_len, ttft * 1e3, tpot * 1e3,
                      batch / tpot if tpot > 0 else 0.0, t1 - t0, eng.cfg.num_hidden_layers, eng.capacity_tokens,
                      [outs[str(i)] for i in range(batch)])
    finally:
        eng.shutdown()


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> int | None:
    for x, y in zip(a, b):
        for i, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return i
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p, skip=("dcp",))
    p.add_argument("--dcp", dest="dcp_list", default="1", help="comma-separated DCP sizes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--compare", default="", help="extra configs 'name:flag=value,flag=value;...' checked for equal tokens")
    p.add_argument("--out", default=None, help="JSON output file")
    ns = p.parse_args(argv)
    base = EngineArgs.from_cli(ns)
    results: list[Result] = []
    for d in [int(x) for x in ns.dcp_list.split(",")]:
        a = EngineArgs(**{**asdict(base), "dcp": d})
        results.append(run_one(a, f"tp{a.tp}-dcp{d}", ns.batch, ns.input_len, ns.output_len, a.seed))
        print(f"done {results[-1].label}: TTFT {results[-1].ttft_ms:.1f} ms, TPOT {results[-1].tpot_ms:.3f} ms", flush=True)
    for spec in filter(None, ns.compare.split(";")):
        name, _, flags = spec.partition(":")
        over = {}
        for kv in filter(None, flags.split(",")):
            k, _, v = kv.partition("=")
            field = k.replace("-", "_")
            cur = getattr(base, field)
            over[field] = type(cur)(v) if cur is not None and not isinstance(cur, bool) else (v == "true" if isinstance(cur, bool) else v)
        a = EngineArgs(**{**asdict(base), "dcp": int(over.pop("dcp", base.dcp)), **over})
        results.append(run_one(a, name, ns.batch, ns.input_len, ns.output_len, a.seed))
        print(f"done {name}", flush=True)
    ref = results[0]
    base_tpot = {r.tp: r.tpot_ms for r in results if r.dcp == 1}
    rows = []
    for r in results:
        mm = first_mismatch(ref.output_ids, r.output_ids)
        added = (r.tpot_ms - base_tpot[r.tp]) * 1e3 / r.num_layers if r.tp in base_tpot else None
        rows.append({**{k: v for k, v in asdict(r).items() if k != "output_ids"},
                     "added_us_per_layer": added, "tokens_equal_to_first": mm is None, "first_mismatch": mm})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "device": gpu, "argv": argv, "rows": rows}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{gpu}, {ns.batch} x ({ns.input_len} in / {ns.output_len} out), {ref.num_layers} layers")
    print(f"{'config':<22}{'TTFT ms':>10}{'TPOT ms':>10}{'tok/s':>10}{'+us/layer':>11}{'KV tokens':>12}  tokens==first")
    for r in rows:
        added = f"{r['added_us_per_layer']:.1f}" if r["added_us_per_layer"] is not None else "-"
        eq = "yes" if r["tokens_equal_to_first"] else f"no (@{r['first_mismatch']})"
        print(f"{r['label']:<22}{r['ttft_ms']:>10.1f}{r['tpot_ms']:>10.3f}{r['decode_tok_s']:>10.1f}{added:>11}"
              f"{r['kv_tokens']:>12,}  {eq}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
