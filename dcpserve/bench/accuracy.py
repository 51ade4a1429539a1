"""Accuracy of a served model on the synthetic long-context retrieval task the demo model is trained on
(dcpserve/train/task.py), in the style of SGLang's few-shot GSM8K script:

    python -m dcpserve.bench.accuracy --host 127.0.0.1 --port 30000 --num-questions 100 --context-len 1024 \\
        --num-facts 16 --parallel 8 --seed 0 --output-file acc.json

Each question is a document of about --context-len words holding --num-facts facts ("the code of kavo is
73 .") and ending in "question : what is the code of kavo ? answer :". The server completes it greedily
(POST /v1/completions, temperature 0, --max-tokens 2) and the first whitespace-separated word of the completion
is the prediction: correct if it equals the code, invalid if it is not a number 0-99. Chance is about
1/num_facts for a model that picks one of the document's codes, 1/100 for one that picks any number.

The questions depend only on (--seed, --context-len, --num-facts), so every server (every DCP size) answers
the same ones and their predictions can be compared one by one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from dcpserve.bench.serving import _pct, headers
from dcpserve.train import task

DEFAULT_MAX_TOKENS = 2  # the answer is one token; a second one shows what follows it (normally ".")
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# The codes are the vocabulary words "0".."99": "007" or "100" is no code the model could have learnt.
VALID_ANSWER = re.compile(r"0|[1-9][0-9]?")


class EvalError(RuntimeError):
    """The evaluation cannot run at all (server unreachable, wrong API key, ...): one line for the user."""


# ---------------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Score:
    prediction: str  # first whitespace-separated word of the completion ("" if there is none)
    correct: bool
    invalid: bool  # not a code 0-99 (an empty completion included)


def score_completion(completion: str, answer: str) -> Score:
    words = completion.split()
    prediction = words[0] if words else ""
    invalid = VALID_ANSWER.fullmatch(prediction) is None
    return Score(prediction, not invalid and prediction == answer, invalid)


# ---------------------------------------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    index: int
    prompt: str
    answer: str


def make_questions(num_questions: int, context_len: int, num_facts: int, seed: int) -> list[Question]:
    """One generator for all questions, so the set depends on the seed alone (not on timing or order)."""
    rng = random.Random(seed)
    out = []
    for i in range(num_questions):
        prompt, answer = task.prompt(rng, context_len, num_facts)
        out.append(Question(i, prompt, answer))
    return out


@dataclass
class Record:
    """One question's outcome, as written to the JSON file."""

    index: int
    answer: str
    prompt_words: int
    prompt_tokens: int | None = None  # the server's count (usage)
    bos_first: bool | None = None  # did the server's tokenization start with the task's BOS (None: unknown)
    completion: str = ""
    completion_tokens: int = 0
    prediction: str | None = None  # None: the request failed
    correct: bool = False
    invalid: bool = False
    latency_s: float = 0.0
    error: str = ""


# ---------------------------------------------------------------------------------------------- client
def normalize_base_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


async def fetch_model(client, base_url: str, api_key: str | None) -> str:
    """The served model's name, turning the ways this fails into one readable line."""
    import httpx

    try:
        r = await client.get(f"{base_url}/v1/models", headers=headers(api_key), timeout=30)
    except httpx.HTTPError as e:
        raise EvalError(f"cannot reach the server at {base_url} ({type(e).__name__}: {e or 'no details'}); "
                        "is it running? (python -m dcpserve serve ...)") from None
    if r.status_code == 401:
        raise EvalError(f"{base_url} wants an API key: pass --api-key (or set OPENAI_API_KEY)")
    if r.status_code != 200:
        raise EvalError(f"GET {base_url}/v1/models answered HTTP {r.status_code}: {error_message(r)}")
    data = r.json().get("data") or []
    if not data:
        raise EvalError(f"{base_url}/v1/models lists no model")
    return data[0]["id"]


def error_message(r) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def request_body(model: str, q: Question, max_tokens: int) -> dict[str, Any]:
    # return_token_ids (a vLLM/dcpserve extension, ignored elsewhere) shows whether the server's tokenizer put
    # BOS first, as every training document has it.
    return {"model": model, "prompt": q.prompt, "max_tokens": max_tokens, "temperature": 0.0, "return_token_ids": True}


async def ask(client, url: str, body: dict[str, Any], api_key: str | None, q: Question) -> Record:
    rec = Record(index=q.index, answer=q.answer, prompt_words=len(q.prompt.split()))
    start = time.perf_counter()
    try:
        r = await client.post(url, json=body, headers=headers(api_key))
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash of the evaluation
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.latency_s = time.perf_counter() - start
    if r.status_code != 200:
        rec.error = f"HTTP {r.status_code}: {error_message(r)}"
        return rec
    try:
        msg = r.json()
        rec.completion = msg["choices"][0]["text"]
    except (ValueError, KeyError, IndexError, TypeError):
        rec.error = f"malformed response: {r.text[:300]}"
        return rec
    usage = msg.get("usage") or {}
    rec.prompt_tokens = usage.get("prompt_tokens")
    rec.completion_tokens = usage.get("completion_tokens") or 0
    prompt_ids = msg.get("prompt_token_ids")
    if prompt_ids:
        rec.bos_first = prompt_ids[0] == task.TOKEN_ID[task.BOS]
    s = score_completion(rec.completion, q.answer)
    rec.prediction, rec.correct, rec.invalid = s.prediction, s.correct, s.invalid
    return rec


def _progress(total: int, desc: str, disabled: bool):
    if disabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="q")


async def _run(base_url: str, questions: list[Question], parallel: int, api_key: str | None, max_tokens: int,
               request_timeout_s: float, disable_tqdm: bool) -> tuple[str, list[Record], float]:
    import httpx

    limits = httpx.Limits(max_connections=parallel, max_keepalive_connections=parallel)
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await fetch_model(client, base_url, api_key)
        url = f"{base_url}/v1/completions"
        sem = asyncio.Semaphore(parallel)
        bar = _progress(len(questions), "questions", disable_tqdm)

        async def limited(q: Question) -> Record:
            async with sem:
                rec = await ask(client, url, request_body(model, q, max_tokens), api_key, q)
            if bar is not None:
                bar.update(1)
            return rec

        t0 = time.perf_counter()
        try:
            records = await asyncio.gather(*(limited(q) for q in questions))
        finally:
            if bar is not None:
                bar.close()
        return model, list(records), time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- metrics
def summarize(records: list[Record], total_time_s: float) -> dict[str, Any]:
    n = len(records)
    ok = [r for r in records if not r.error]
    latencies = [r.latency_s for r in ok]
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    bos = [r.bos_first for r in ok if r.bos_first is not None]
    out_tokens = sum(r.completion_tokens for r in ok)
    return {
        "accuracy": sum(r.correct for r in records) / n if n else 0.0,  # failed requests count as wrong
        "invalid_rate": sum(r.invalid for r in records) / n if n else 0.0,
        "num_correct": sum(r.correct for r in records),
        "num_invalid": sum(r.invalid for r in records),
        "num_errors": n - len(ok),
        "latency_mean_s": statistics.fmean(latencies) if latencies else 0.0,
        "latency_p50_s": _pct(latencies, 50),
        "latency_p99_s": _pct(latencies, 99),
        "output_throughput": out_tokens / total_time_s if total_time_s else 0.0,
        "total_completion_tokens": out_tokens,
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompt_tokens else 0.0,
        "bos_first_rate": sum(bos) / len(bos) if bos else None,
        "total_time_s": total_time_s,
    }


def run_eval(base_url: str, num_questions: int, context_len: int, num_facts: int, parallel: int, seed: int,
             api_key: str | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
             request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, disable_tqdm: bool = False) -> dict[str, Any]:
    """Ask `num_questions` questions (drawn from `seed`) of a running server; the metrics plus per-question
    records. Raises EvalError when the evaluation cannot start; failed requests are recorded, not raised."""
    check_task_args(num_questions, context_len, num_facts, parallel)
    base_url = normalize_base_url(base_url)
    questions = make_questions(num_questions, context_len, num_facts, seed)
    model, records, total_time_s = asyncio.run(
        _run(base_url, questions, parallel, api_key, max_tokens, request_timeout_s, disable_tqdm))
    return {"base_url": base_url, "model": model, "num_questions": num_questions, "context_len": context_len,
            "num_facts": num_facts, "parallel": parallel, "seed": seed, "max_tokens": max_tokens,
            **summarize(records, total_time_s), "first_error": next((r.error for r in records if r.error), ""),
            "records": [asdict(r) for r in records]}


def check_task_args(num_questions: int, context_len: int, num_facts: int, parallel: int) -> None:
    if num_questions < 1 or parallel < 1:
        raise EvalError("--num-questions and --parallel must be >= 1")
    if not 1 <= num_facts <= len(task.NAMES):
        raise EvalError(f"--num-facts must be in [1, {len(task.NAMES)}] (the task has {len(task.NAMES)} names)")
    if context_len < 7 * num_facts:
        raise EvalError(f"--context-len {context_len} cannot hold {num_facts} facts of 7 words each")


# ---------------------------------------------------------------------------------------------- report
def format_table(m: dict[str, Any]) -> str:
    def row(label: str, value: Any, fmt: str = "") -> str:
        return f"{label:<34} {value:{fmt}}" if fmt else f"{label:<34} {value}"

    lines = ["{s:{c}^50}".format(s=" Accuracy Result ", c="="),
             row("Model:", m["model"]),
             row("Questions:", m["num_questions"]),
             row("Context length (words):", m["context_len"]),
             row("Facts per document:", m["num_facts"]),
             row("Accuracy:", f"{m['accuracy']:.3f} ({m['num_correct']}/{m['num_questions']})"),
             row("Invalid:", f"{m['invalid_rate']:.3f} ({m['num_invalid']}/{m['num_questions']})"),
             row("Failed requests:", m["num_errors"]),
             row("Latency mean / p50 / p99 (s):",
                 f"{m['latency_mean_s']:.3f} / {m['latency_p50_s']:.3f} / {m['latency_p99_s']:.3f}"),
             row("Output throughput (tok/s):", m["output_throughput"], ".2f"),
             row("Prompt tokens (mean):", m["prompt_tokens_mean"], ".1f"),
             row("Total time (s):", m["total_time_s"], ".2f"),
             "=" * 50]
    return "\n".join(lines)


def warnings_for(m: dict[str, Any]) -> list[str]:
    out = []
    if m["num_errors"]:
        out.append(f"{m['num_errors']} of {m['num_questions']} requests failed; first error: {m['first_error']}")
    if m["bos_first_rate"] == 0.0:
        out.append("the server's prompt tokens do not start with the task's BOS token, but the model was trained "
                   "on documents that do: is this the task tokenizer?")
    return out


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcpserve.bench.accuracy",
                                description="Accuracy of a served model on the synthetic key-value retrieval task.")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--num-questions", type=int, default=100)
    p.add_argument("--context-len", type=int, default=1024, help="words of context (facts + filler) per question")
    p.add_argument("--num-facts", type=int, default=16, help="facts per document (one is asked about)")
    p.add_argument("--parallel", type=int, default=8, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0, help="draws the questions")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, help="seconds per request")
    p.add_argument("--output-file", default=None, help="write the metrics and per-question records as JSON")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    try:
        m = run_eval(base_url, args.num_questions, args.context_len, args.num_facts, args.parallel, args.seed,
                     args.api_key or os.environ.get("OPENAI_API_KEY"), max_tokens=args.max_tokens,
                     request_timeout_s=args.request_timeout,
                     disable_tqdm=args.disable_tqdm)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(m))
    for w in warnings_for(m):
        print(f"warning: {w}", file=sys.stderr)
    if args.output_file:
        with open(args.output_file, "w") as f:
            json.dump({"args": vars(args), **m}, f, indent=2)
        print(f"wrote {args.output_file}")
    return 1 if m["num_errors"] == m["num_questions"] else 0


if __name__ == "__main__":
    sys.exit(main())
