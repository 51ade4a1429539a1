"""Load: 200 concurrent streaming requests, some aborted by the client at random points. Every request that
finishes has exactly the greedy reference tokens of its prompt; afterwards nothing runs or waits, KV usage is
back to zero on every rank, and the server is healthy."""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

NUM_REQUESTS = 200
NUM_PROMPTS = 25
MAX_TOKENS = 6


async def one_request(client, model: str, prompt: list[int], abort_after: int | None) -> tuple[str, list[int]]:
    """Returns ("finished", tokens) or ("aborted", tokens so far)."""
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    tokens: list[int] = []
    try:
        if abort_after == 0:
            return "aborted", tokens
        async for chunk in stream:
            if not chunk.choices:
                continue
            tokens += chunk.choices[0].model_extra["token_ids"]
            if chunk.choices[0].finish_reason is not None:
                assert chunk.choices[0].finish_reason == "length"
                return "finished", tokens
            if abort_after is not None and len(tokens) >= abort_after:
                return "aborted", tokens
    finally:
        await stream.close()  # closing the HTTP stream is the client disconnect
    return "truncated", tokens


async def run_load(server, prompts: list[list[int]], plan: list[tuple[int, int | None]]):
    client = server.async_openai()
    model = (await client.models.list()).data[0].id
    results = await asyncio.gather(*(one_request(client, model, prompts[p], a) for p, a in plan))
    await client.close()
    return results


def wait_idle(server, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        kv = [v for k, v in m.items() if k.startswith("dcpserve_kv_cache_usage_perc")]
        if m["dcpserve_num_requests_running"] == 0 and m["dcpserve_num_requests_waiting"] == 0 and not any(kv):
            return m
        if time.time() > deadline:
            raise AssertionError(f"server not idle after load: {m}")
        time.sleep(0.2)


def test_concurrent_streams_with_client_aborts(server_d2, reference):
    rng = random.Random(0)
    shared = [rng.randrange(6, 512) for _ in range(40)]  # some prompts share a prefix: cache hits under load
    prompts = []
    for i in range(NUM_PROMPTS):
        tail = [rng.randrange(6, 512) for _ in range(rng.randrange(4, 40))]
        prompts.append((shared if i % 3 == 0 else []) + tail)
    plan = [(i % NUM_PROMPTS, rng.choice([0, 1, 2, 3]) if rng.random() < 0.3 else None) for i in range(NUM_REQUESTS)]
    expected = reference.greedy(prompts, MAX_TOKENS)

    results = asyncio.run(run_load(server_d2, prompts, plan))

    finished = 0
    for (p, abort_after), (status, tokens) in zip(plan, results):
        if status == "finished":
            finished += 1
            assert tokens == expected[p], f"prompt {p}: {tokens} != {expected[p]}"
        else:
            assert status == "aborted" and abort_after is not None
            assert tokens == expected[p][: len(tokens)]
    assert finished >= NUM_REQUESTS // 2
    m = wait_idle(server_d2)
    assert m["dcpserve_request_success_total{finish_reason=\"abort\"}"] >= 1
    assert httpx.get(server_d2.base_url + "/health", timeout=30).json() == {"status": "ok"}
