"""Prometheus metrics, written in the text exposition format by hand (no client library needed).

The engine thread updates the values, the HTTP thread renders them; one lock guards both."""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)

PREFIX = "dcpserve_"


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.n}")
        return out


@dataclass
class EngineGauges:
    """A snapshot the engine thread publishes after every iteration."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    prefill_tokens: int = 0  # tokens computed by prefill steps, recomputation after preemption included
    steps: int = 0
    healthy: bool = True

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


class ServerMetrics:
    def __init__(self, tp: int, capacity_tokens: int = 0):
        self.tp = tp
        self.capacity_tokens = capacity_tokens
        self.lock = threading.Lock()
        self.gauges = EngineGauges()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    # -- engine thread ---------------------------------------------------------------------------------
    def publish(self, gauges: EngineGauges) -> None:
        with self.lock:
            self.gauges = gauges

    def on_first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        with self.lock:
            self.ttft.observe(ttft_s)
            self.prompt_tokens += prompt_tokens

    def on_tokens(self, n: int) -> None:
        with self.lock:
            self.generation_tokens += n

    def on_finish(self, reason: str, e2e_s: float, tpot_s: float | None) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.e2e.observe(e2e_s)
            if tpot_s is not None:
                self.tpot.observe(tpot_s)

    def on_abort(self) -> None:
        with self.lock:
            self.finished["abort"] = self.finished.get("abort", 0) + 1

    def counters(self) -> tuple[int, int]:
        with self.lock:
            return self.prompt_tokens, self.generation_tokens

    # -- HTTP thread -----------------------------------------------------------------------------------
    def render(self) -> str:
        with self.lock:
            g = self.gauges
            out: list[str] = []
            _metric(out, "num_requests_running", "gauge", "Requests in the running (decoding) batch.", g.running)
            _metric(out, "num_requests_waiting", "gauge", "Requests queued for prefill (or preempted).", g.waiting)
            _header(out, "kv_cache_usage_perc", "gauge", "Fraction of KV cache pages in use, per rank (0..1).")
            for r in range(self.tp):
                out.append(f'{PREFIX}kv_cache_usage_perc{{rank="{r}"}} {g.kv_usage:.6f}')
            _metric(out, "kv_cache_capacity_tokens", "gauge", "Tokens the KV cache holds (all ranks together).",
                    self.capacity_tokens)
            _metric(out, "prefix_cache_hit_rate", "gauge", "Prompt tokens served from the prefix cache / prompt "
                    "tokens looked up.", f"{g.prefix_hit_rate:.6f}")
            _metric(out, "prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                    g.prefix_hit_tokens)
            _metric(out, "prefix_cache_queried_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
                    g.prefix_queried_tokens)
            _metric(out, "prompt_tokens_total", "counter", "Prompt tokens of requests that produced a first token.",
                    self.prompt_tokens)
            _metric(out, "generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
            _metric(out, "prefill_computed_tokens_total", "counter", "Tokens computed by prefill steps "
                    "(recomputation after preemption included).", g.prefill_tokens)
            _metric(out, "engine_steps_total", "counter", "Engine forward steps.", g.steps)
            _header(out, "request_success_total", "counter", "Finished requests by finish reason.")
            for reason, n in sorted(self.finished.items()):
                out.append(f'{PREFIX}request_success_total{{finish_reason="{reason}"}} {n}')
            _metric(out, "engine_healthy", "gauge", "1 while the engine and all ranks are alive.", int(g.healthy))
            for name, hist, help_ in (("time_to_first_token_seconds", self.ttft, "Time to first token."),
                                      ("time_per_output_token_seconds", self.tpot,
                                       "Per-request (E2E - TTFT) / (output tokens - 1)."),
                                      ("e2e_request_latency_seconds", self.e2e, "End-to-end request latency.")):
                _header(out, name, "histogram", help_)
                out.extend(hist.lines(PREFIX + name))
            return "\n".join(out) + "\n"


def _header(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {PREFIX}{name} {help_}")
    out.append(f"# TYPE {PREFIX}{name} {kind}")


def _metric(out: list[str], name: str, kind: str, help_: str, value) -> None:
    _header(out, name, kind, help_)
    out.append(f"{PREFIX}{name} {value}")


def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels}` -> value; for tests and tools that read /metrics."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values
