"""Offline engine benchmark (no HTTP): TTFT, TPOT and tokens/s for fixed input/output lengths, for several
DCP sizes in turn, plus a greedy-token check across configurations.

  python -m dcpserve.bench.engine --model-path builtin:deepseek-v3.2 --load-format dummy --num-layers 4 \\
      --tp 4 --dcp 1,2,4 --batch 1 --input-len 4096 --output-len 1536 --attention-backend triton --out r.json

Prints a table last and writes JSON. TTFT is the median of `--ttft-repeats` prefills of fresh prompts (the
last one starts the measured run; every sample is in the JSON as `ttft_samples_ms`). TTFTs move by several
percent between engine starts: to compare DCP sizes, run them interleaved (`--dcp 1,2,4,4,2,1`). TPOT is the
wall time after the last first token over the remaining steps; `step ms` is the median of the steps that
decoded the whole batch, which no prefill step can skew.
The whole batch always decodes together (`--max-running-requests` is raised to the batch if lower).
`--compare` runs extra configurations (e.g. the torch backend, eager mode) and reports whether their greedy
tokens equal the first configuration's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace

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
    decode_step_ms: float  # median of the steps that decoded the whole batch (no prefill in them)
    decode_tok_s: float
    total_s: float
    num_layers: int
    kv_tokens: int
    output_ids: list[list[int]]
    logits: list[torch.Tensor] | None = None  # sequence 0's logits per step (with --logits)
    ttft_samples_ms: list[float] | None = None  # every prefill timed for the TTFT median, in run order


def prompts(batch: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, input_len), generator=g).tolist()


def batch_args(args: EngineArgs, batch: int) -> EngineArgs:
    """The batch must decode together: with fewer running slots than prompts, the rest would queue and
    prefill while the first ones decode, and TPOT would mix both phases."""
    if args.max_running_requests >= batch:
        return args
    print(f"--max-running-requests {args.max_running_requests} < batch {batch}: using {batch}", flush=True)
    return replace(args, max_running_requests=batch)


def prefill_time(eng: LLMEngine, group: list[list[int]], tag: str) -> float:
    """Seconds from adding `group` to the last of its first tokens (one-token requests: prefill only)."""
    t0 = time.perf_counter()
    for i, p in enumerate(group):
        eng.add_request(f"{tag}{i}", p, SamplingParams(max_tokens=1, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - t0


def run_one(args: EngineArgs, label: str, batch: int, input_len: int, output_len: int, seed: int,
            warmup: bool = True, logits: bool = False, ttft_repeats: int = 1) -> Result:
    args = batch_args(args, batch)
    eng = LLMEngine(args, record_logits=logits)
    try:
        ps = prompts(batch, input_len, eng.cfg.vocab_size, seed)
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        if warmup:
            # Compile kernels and capture the decode graphs this run will use: other prompts (no prefix-cache
            # hits later), one at the run's first context length and one at its last.
            short = prompts(batch, input_len, eng.cfg.vocab_size, seed + 1)
            long = prompts(batch, max(input_len + output_len - 8, 1), eng.cfg.vocab_size, seed + 2)
            for tag, group in (("ws", short), ("wl", long)):
                for i, p in enumerate(group):
                    eng.add_request(f"{tag}{i}", p, SamplingParams(max_tokens=min(output_len, 8), ignore_eos=True))
                while eng.has_unfinished():
                    eng.step()
        # One TTFT sample is noisy at batch 1; extra prefill-only runs of fresh prompts (no prefix-cache hits).
        ttfts = [prefill_time(eng, prompts(batch, input_len, eng.cfg.vocab_size, seed + 10 + r), f"t{r}_")
                 for r in range(ttft_repeats - 1)]
        t0 = time.perf_counter()
        for i, p in enumerate(ps):
            eng.add_request(str(i), p, params)
        first: dict[str, float] = {}
        outs: dict[str, list[int]] = {str(i): [] for i in range(batch)}
        seq0_logits: list[torch.Tensor] = []
        full_steps: list[float] = []  # durations of steps that decoded all `batch` sequences
        while eng.has_unfinished():
            s0, prefilled = time.perf_counter(), eng.stats.prefill_tokens
            step = eng.step()
            if eng.stats.prefill_tokens == prefilled and len(step) == batch:
                full_steps.append(time.perf_counter() - s0)
            for o in step:
                outs[o.req_id] += o.new_token_ids
                first.setdefault(o.req_id, time.perf_counter())
                if o.req_id == "0" and o.logits is not None:
                    seq0_logits.append(o.logits)
        t1 = time.perf_counter()
        ttft = max(first.values()) - t0  # the batch's prefill is done when the last first token arrives
        tpot = (t1 - t0 - ttft) / max(output_len - 1, 1)
        samples_ms = [x * 1e3 for x in [*ttfts, ttft]]
        step_ms = statistics.median(full_steps) * 1e3 if full_steps else float("nan")
        return Result(label, args.tp, args.dcp, batch, input_len, output_len, statistics.median(samples_ms),
                      tpot * 1e3, step_ms, batch / tpot if tpot > 0 else 0.0, t1 - t0, eng.cfg.num_hidden_layers,
                      eng.capacity_tokens,
                      [outs[str(i)] for i in range(batch)], seq0_logits or None, samples_ms)
    finally:
        eng.shutdown()


def divergence(ref: Result, other: Result) -> dict:
    """Where sequence 0's greedy tokens first differ, how close the reference's top-2 logits were there, and how
    far the two runs' logits were apart before it: a mismatch at a gap smaller than that noise is a near-tie
    (bf16 rounding), not a wrong result."""
    a, b = ref.output_ids[0], other.output_ids[0]
    m = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), None)
    out: dict = {"seq0_first_mismatch": m}
    if ref.logits and other.logits:
        upto = len(ref.logits) if m is None else m + 1
        diffs = [float((x - y).abs().max()) for x, y in zip(ref.logits[:upto], other.logits[:upto])]
        out["max_logit_diff_until_mismatch"] = max(diffs) if diffs else 0.0
        if m is not None:
            top2 = ref.logits[m].topk(2).values
            out["ref_top2_gap_at_mismatch"] = float(top2[0] - top2[1])
    return out


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
    p.add_argument("--logits", action="store_true", help="record logits to explain token mismatches")
    p.add_argument("--ttft-repeats", type=int, default=1, help="TTFT = median of this many prefills (fresh prompts)")
    p.add_argument("--out", default=None, help="JSON output file")
    ns = p.parse_args(argv)
    base = EngineArgs.from_cli(ns)
    results: list[Result] = []
    for d in [int(x) for x in ns.dcp_list.split(",")]:
        a = EngineArgs(**{**asdict(base), "dcp": d})
        results.append(run_one(a, f"tp{a.tp}-dcp{d}", ns.batch, ns.input_len, ns.output_len, a.seed,
                               logits=ns.logits, ttft_repeats=ns.ttft_repeats))
        r = results[-1]
        print(f"done {r.label}: TTFT {r.ttft_ms:.1f} ms (min {min(r.ttft_samples_ms):.1f}), TPOT {r.tpot_ms:.3f} ms, "
              f"decode step {r.decode_step_ms:.3f} ms", flush=True)
    for spec in filter(None, ns.compare.split(";")):
        name, _, flags = spec.partition(":")
        over = {}
        for kv in filter(None, flags.split(",")):
            k, _, v = kv.partition("=")
            field = k.replace("-", "_")
            cur = getattr(base, field)
            over[field] = type(cur)(v) if cur is not None and not isinstance(cur, bool) else (v == "true" if isinstance(cur, bool) else v)
        a = EngineArgs(**{**asdict(base), "dcp": int(over.pop("dcp", base.dcp)), **over})
        results.append(run_one(a, name, ns.batch, ns.input_len, ns.output_len, a.seed, logits=ns.logits,
                               ttft_repeats=ns.ttft_repeats))
        print(f"done {name}", flush=True)
    ref = results[0]
    base_tpot: dict[int, float] = {}
    for r in results:  # the first DCP=1 row of each TP size is the baseline
        if r.dcp == 1:
            base_tpot.setdefault(r.tp, r.tpot_ms)
    rows = []
    for r in results:
        mm = first_mismatch(ref.output_ids, r.output_ids)
        added = (r.tpot_ms - base_tpot[r.tp]) * 1e3 / r.num_layers if r.tp in base_tpot else None
        rows.append({**{k: v for k, v in asdict(r).items() if k not in ("output_ids", "logits")},
                     "added_us_per_layer": added, "tokens_equal_to_first": mm is None, "first_mismatch": mm,
                     **divergence(ref, r)})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"date": time.strftime("%Y-%m-%d"), "device": gpu, "argv": argv, "rows": rows}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{gpu}, {ns.batch} x ({ns.input_len} in / {ns.output_len} out), {ref.num_layers} layers")
    print(f"{'config':<22}{'TTFT ms':>10}{'TPOT ms':>10}{'step ms':>10}{'tok/s':>10}{'+us/layer':>11}{'KV tokens':>12}"
          "  tokens==first")
    for r in rows:
        added = f"{r['added_us_per_layer']:.1f}" if r["added_us_per_layer"] is not None else "-"
        eq = "yes" if r["tokens_equal_to_first"] else f"no (@{r['first_mismatch']})"
        if "ref_top2_gap_at_mismatch" in r:
            eq += f" gap {r['ref_top2_gap_at_mismatch']:.3f} vs noise {r['max_logit_diff_until_mismatch']:.3f}"
        print(f"{r['label']:<22}{r['ttft_ms']:>10.1f}{r['tpot_ms']:>10.3f}{r['decode_step_ms']:>10.3f}"
              f"{r['decode_tok_s']:>10.1f}{added:>11}"
              f"{r['kv_tokens']:>12,}  {eq}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
