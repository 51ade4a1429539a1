"""Serving benchmark for any OpenAI-compatible server (dcpserve, SGLang, vLLM, ...).

    python -m dcpserve.bench_serving --port 30000 --dataset-name random-ids --num-prompts 200 \\
        --random-input-len 1024 --random-output-len 128 --random-range-ratio 1 --max-concurrency 16

Every request is a streaming POST /v1/completions (`stream_options.include_usage`, `ignore_eos`). Metric
definitions (../shared/DESIGN.md section 5, the SGLang/vLLM convention):
  TTFT  time from sending the request to the first content chunk (a chunk that carries a choice);
  ITL   gaps between consecutive content chunks (pooled over all requests);
  TPOT  per request (E2E - TTFT) / (output_len - 1), requests with output_len > 1;
  E2E   time from sending the request to the end of its stream;
  throughput: completed requests, input tokens, output tokens (and their sum) / benchmark duration.
output_len is the server's `usage.completion_tokens`, or the number of content chunks if it reports none.
Datasets: `random-ids` sends token-id prompts of the exact drawn lengths (with `--random-range-ratio 1`
every prompt is exactly --random-input-len tokens and, thanks to ignore_eos, every output exactly
--random-output-len); `random` sends text.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

WORDS = ("the of and to in is it you that was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call "
         "first who may down side been now find").split()


# ---------------------------------------------------------------------------------------------- data
@dataclass
class RequestSpec:
    prompt: str | list[int]
    input_len: int  # tokens (exact for random-ids; an estimate for text without a tokenizer)
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    input_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunks: int = 0


def draw_lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    """SGLang's rule: uniform in [max(1, length * ratio), length]; ratio 1 gives exactly `length`."""
    low = max(1, int(length * ratio))
    return [rng.randint(low, max(low, length)) for _ in range(n)]


def load_tokenizer(path: str | None):
    if not path:
        return None
    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(file)


def sample_requests(args: argparse.Namespace, tokenizer, n: int) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    in_lens = draw_lengths(rng, n, args.random_input_len, args.random_range_ratio)
    out_lens = draw_lengths(rng, n, args.random_output_len, args.random_range_ratio)
    vocab = args.random_vocab_size or (tokenizer.get_vocab_size() if tokenizer is not None else 256)
    specials = set(tokenizer.get_added_tokens_decoder()) if tokenizer is not None else set()
    pool = [i for i in range(vocab) if i not in specials] or list(range(vocab))
    reqs: list[RequestSpec] = []
    text_pool: list[int] = []
    for n_in, n_out in zip(in_lens, out_lens):
        if args.dataset_name == "random-ids":
            reqs.append(RequestSpec([rng.choice(pool) for _ in range(n_in)], n_in, n_out))
        elif tokenizer is not None:
            text_pool = text_pool or _round_trip_tokens(tokenizer, pool, rng)
            ids = tokenizer.encode(tokenizer.decode([rng.choice(text_pool) for _ in range(n_in)]),
                                   add_special_tokens=False).ids[:n_in]
            reqs.append(RequestSpec(tokenizer.decode(ids), len(ids), n_out))
        else:
            reqs.append(RequestSpec(" ".join(rng.choice(WORDS) for _ in range(n_in)), n_in, n_out))
    return reqs


def _round_trip_tokens(tokenizer, pool: list[int], rng: random.Random, limit: int = 5000) -> list[int]:
    """Tokens that decode to clean text and encode back to themselves (a lone UTF-8 byte decodes to U+FFFD,
    which re-encodes to three tokens), so a text prompt keeps its drawn length."""
    sample = pool if len(pool) <= limit else rng.sample(pool, limit)
    good = []
    for i in sample:
        text = tokenizer.decode([i])
        if text and "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False).ids == [i]:
            good.append(i)
    return good or pool


# ---------------------------------------------------------------------------------------------- client
def headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model(client, base_url: str, api_key: str | None) -> str:
    r = await client.get(f"{base_url}/v1/models", headers=headers(api_key))
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise SystemExit(f"{base_url}/v1/models lists no model: pass --model")
    return data[0]["id"]


def payload(args: argparse.Namespace, model: str, spec: RequestSpec) -> dict[str, Any]:
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.output_len, "temperature": args.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if not args.disable_ignore_eos:
        body["ignore_eos"] = True
    body.update(args.extra_request_body)
    return body


async def send_one(client, url: str, body: dict[str, Any], api_key: str | None, spec: RequestSpec) -> RequestResult:
    res = RequestResult(input_len=spec.input_len)
    start = time.perf_counter()
    last = start
    usage_out = None
    try:
        async with client.stream("POST", url, json=body, headers=headers(api_key)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = str(msg["error"])[:300]
                    return res
                now = time.perf_counter()
                if msg.get("choices"):
                    if res.chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    res.chunks += 1
                    last = now
                usage = msg.get("usage")
                if usage:
                    usage_out = usage.get("completion_tokens")
                    res.input_len = usage.get("prompt_tokens") or res.input_len
        res.e2e = time.perf_counter() - start
        res.output_len = usage_out if usage_out is not None else res.chunks
        res.success = res.chunks > 0
        if not res.success:
            res.error = "stream ended without a content chunk"
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash of the benchmark
        res.error = f"{type(e).__name__}: {e}"
    return res


async def arrivals(n: int, rate: float, rng: random.Random):
    """Poisson process: exponential gaps with mean 1/rate; rate inf sends everything at once."""
    for i in range(n):
        yield i
        if math.isfinite(rate) and rate > 0 and i < n - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if base_url.endswith("/v1"):
        base_url = base_url[:-3]
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model = args.model or await fetch_model(client, base_url, api_key)
        tokenizer = load_tokenizer(args.tokenizer or (model if os.path.isdir(model) else None))
        # Warm-up prompts are drawn after the measured ones, so they share no prefix-cache pages with them.
        drawn = sample_requests(args, tokenizer, args.num_prompts + args.warmup_requests)
        reqs, warmup = drawn[: args.num_prompts], drawn[args.num_prompts:]
        url = f"{base_url}/v1/completions"
        for spec in warmup:
            warm = await send_one(client, url, payload(args, model, spec), api_key, spec)
            if not warm.success:
                raise SystemExit(f"warm-up request failed: {warm.error}")
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = _progress(len(reqs), args.disable_tqdm)

        async def limited(spec: RequestSpec) -> RequestResult:
            if sem is None:
                r = await send_one(client, url, payload(args, model, spec), api_key, spec)
            else:
                async with sem:
                    r = await send_one(client, url, payload(args, model, spec), api_key, spec)
            if bar is not None:
                bar.update(1)
            return r

        rng = random.Random(args.seed + 1)
        t0 = time.perf_counter()
        tasks = []
        async for i in arrivals(len(reqs), args.request_rate, rng):
            tasks.append(asyncio.create_task(limited(reqs[i])))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar is not None:
            bar.close()
    return summarize(args, model, base_url, results, duration)


def _progress(total: int, disabled: bool):
    if disabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")


# ---------------------------------------------------------------------------------------------- metrics
def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
            f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
            f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
            f"p99_{name}_ms": _pct(ms, 99)}


def summarize(args: argparse.Namespace, model: str, base_url: str, results: list[RequestResult],
              duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itls = [x for r in ok for x in r.itl]
    out: dict[str, Any] = {
        "base_url": base_url, "model": model, "dataset_name": args.dataset_name,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency, "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "seed": args.seed,
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "input_throughput": total_in / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
        "concurrency": sum(r.e2e for r in ok) / duration if duration else 0.0,
    }
    out.update(_stats("e2e_latency", [r.e2e for r in ok]))
    out.update(_stats("ttft", [r.ttft for r in ok]))
    out.update(_stats("tpot", tpots))
    out.update(_stats("itl", itls))
    out["input_lens"] = [r.input_len for r in results]
    out["output_lens"] = [r.output_len for r in results]
    out["ttfts"] = [r.ttft for r in results]
    out["e2e_latencies"] = [r.e2e for r in results]
    out["itls"] = [r.itl for r in results]
    out["errors"] = [r.error for r in results]
    return out


def format_table(m: dict[str, Any]) -> str:
    def row(label: str, value: Any, fmt: str = "") -> str:
        return f"{label:<40} {value:{fmt}}" if fmt else f"{label:<40} {value}"

    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="),
             row("Backend:", "openai-completions"),
             row("Traffic request rate:", m["request_rate"]),
             row("Max request concurrency:", m["max_concurrency"] or "not set"),
             row("Successful requests:", m["completed"]),
             row("Failed requests:", m["failed"]),
             row("Benchmark duration (s):", m["duration"], ".2f"),
             row("Total input tokens:", m["total_input_tokens"]),
             row("Total generated tokens:", m["total_output_tokens"]),
             row("Request throughput (req/s):", m["request_throughput"], ".2f"),
             row("Input token throughput (tok/s):", m["input_throughput"], ".2f"),
             row("Output token throughput (tok/s):", m["output_throughput"], ".2f"),
             row("Total token throughput (tok/s):", m["total_token_throughput"], ".2f"),
             row("Concurrency:", m["concurrency"], ".2f")]
    for title, key, label in (("End-to-End Latency", "e2e_latency", "E2E Latency"),
                              ("Time to First Token", "ttft", "TTFT"),
                              ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                              ("Inter-Token Latency", "itl", "ITL")):
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("mean", "median", "p99"):
            lines.append(row(f"{stat.capitalize() if stat != 'p99' else 'P99'} {label} (ms):",
                             m[f"{stat}_{key}_ms"], ".2f"))
    lines.append("=" * 50)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcpserve.bench_serving",
                                description="Benchmark an OpenAI-compatible server (streaming /v1/completions).")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or a directory holding one (exact text lengths for --dataset-name random)")
    p.add_argument("--dataset-name", choices=("random-ids", "random"), default="random-ids")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * ratio, len]; 1 gives exact lengths")
    p.add_argument("--random-vocab-size", type=int, default=None,
                   help="token ids for random-ids are drawn below this (default: tokenizer vocab, else 256)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (inf: all at once)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--extra-request-body", type=json.loads, default={}, help="JSON merged into every request")
    p.add_argument("--warmup-requests", type=int, default=1, help="requests sent (and not measured) first")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None, help="write the metrics (and per-request data) as JSON")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def validate(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise SystemExit("--num-prompts must be >= 1")
    if args.random_input_len < 1 or args.random_output_len < 1:
        raise SystemExit("--random-input-len and --random-output-len must be >= 1")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        raise SystemExit("--random-range-ratio must be in [0, 1]")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("--max-concurrency must be >= 1")
    if args.request_rate <= 0:
        raise SystemExit("--request-rate must be > 0 (inf: all at once)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    metrics = asyncio.run(run_benchmark(args))
    print(format_table(metrics))
    if metrics["failed"]:
        first = next(e for e in metrics["errors"] if e)
        print(f"{metrics['failed']} requests failed; first error: {first}", file=sys.stderr)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"args": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf")
                                for k, v in vars(args).items()}, **metrics}, f, indent=2)
        print(f"wrote {args.output_file}")
    return 0 if metrics["completed"] else 1

