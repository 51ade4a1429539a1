"""KV exhaustion: a server whose KV cache holds a few hundred tokens gets requests whose total demand is many
times that. Every request completes (queueing / preemption with recompute, never an error), with the same
greedy tokens as the reference, and the cache is empty afterwards."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

pytestmark = pytest.mark.slow

NUM_REQUESTS = 12
PROMPT_LEN = 40
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def small_kv_server(launch):
    srv = launch("server-small-kv", dcp=2, extra=("--kv-mem-gb", "0.0002"))
    yield srv
    srv.stop()


async def _run_all(server, prompts):
    client = server.async_openai()
    model = (await client.models.list()).data[0].id

    async def one(p):
        r = await client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
        return r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason

    out = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return out


def test_demand_far_over_capacity_completes(small_kv_server, reference):
    server = small_kv_server
    capacity = server.metrics()["dcpserve_kv_cache_capacity_tokens"]
    demand = NUM_REQUESTS * (PROMPT_LEN + MAX_TOKENS)
    assert demand >= 3 * capacity, f"capacity {capacity} too large for this test"
    rng = random.Random(5)
    prompts = [[rng.randrange(6, 512) for _ in range(PROMPT_LEN)] for _ in range(NUM_REQUESTS)]
    expected = reference.greedy(prompts, MAX_TOKENS)

    peak_waiting = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_waiting
        while not done.is_set():
            peak_waiting = max(peak_waiting, server.metrics()["dcpserve_num_requests_waiting"])
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(_run_all(server, prompts))
    finally:
        done.set()
        watcher.join()
    for (tokens, reason), exp in zip(results, expected):
        assert reason == "length"
        assert tokens == exp
    assert peak_waiting > 0  # requests really had to queue
    m = server.metrics()
    assert m["dcpserve_num_requests_running"] == 0 and m["dcpserve_kv_cache_usage_perc{rank=\"0\"}"] == 0
