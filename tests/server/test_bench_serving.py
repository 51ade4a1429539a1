"""`python -m dcpserve.bench_serving` against the CPU server: it runs, prints the table and writes its JSON,
with exact token counts for random-ids at --random-range-ratio 1."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def bench(server, out_file, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dcpserve.bench_serving", "--base-url", server.base_url, "--api-key",
           server.api_key, "--output-file", str(out_file), "--disable-tqdm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_bench_random_ids_exact_lengths(server_d2, tmp_path):
    out = tmp_path / "bench.json"
    r = bench(server_d2, out, "--dataset-name", "random-ids", "--num-prompts", "12", "--random-input-len", "32",
              "--random-output-len", "8", "--random-range-ratio", "1", "--max-concurrency", "4",
              "--random-vocab-size", "512", "--seed", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Serving Benchmark Result" in r.stdout and "Mean TPOT (ms):" in r.stdout
    m = json.loads(out.read_text())
    assert m["completed"] == 12 and m["failed"] == 0
    assert m["total_input_tokens"] == 12 * 32 and m["total_output_tokens"] == 12 * 8
    assert m["output_lens"] == [8] * 12 and m["input_lens"] == [32] * 12
    assert 0 < m["mean_ttft_ms"] and 0 < m["mean_tpot_ms"] and 0 < m["mean_itl_ms"] and 0 < m["mean_e2e_latency_ms"]
    assert m["output_throughput"] == pytest.approx(96 / m["duration"])
    assert m["model"] == server_d2.openai().models.list().data[0].id  # default: first of /v1/models
    assert all(len(itl) == 7 for itl in m["itls"])  # one chunk per token


def test_bench_random_text_with_request_rate(server_d2, tmp_path, tiny_ckpt):
    out = tmp_path / "bench-text.json"
    r = bench(server_d2, out, "--dataset-name", "random", "--num-prompts", "6", "--random-input-len", "24",
              "--random-output-len", "4", "--random-range-ratio", "0.5", "--request-rate", "20",
              "--tokenizer", tiny_ckpt)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["completed"] == 6 and m["request_rate"] == 20.0
    assert all(2 <= n <= 4 for n in m["output_lens"])
    assert all(12 <= n <= 24 for n in m["input_lens"])  # server-reported prompt tokens of exact-length text
