"""Prefix cache through the server: a request sharing a long prefix with an earlier one reuses its pages
(the hit counter in /metrics moves) and its output equals a cold run, at dcp 1 and 2."""
from __future__ import annotations

import random

import pytest

pytestmark = pytest.mark.slow

PREFIX_LEN = 200
HIT = "dcpserve_prefix_cache_hit_tokens_total"


@pytest.mark.parametrize("which", ["server_d1", "server_d2"])
def test_shared_prefix_hits_cache_and_output_equals_cold(which, request, reference):
    server = request.getfixturevalue(which)
    rng = random.Random(which)
    prefix = [rng.randrange(6, 512) for _ in range(PREFIX_LEN)]
    first = prefix + [rng.randrange(6, 512) for _ in range(20)]
    second = prefix + [rng.randrange(6, 512) for _ in range(13)]
    client = server.openai()
    model = client.models.list().data[0].id

    def run(prompt: list[int]) -> list[int]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    before = server.metrics()[HIT]
    out_first = run(first)
    after_first = server.metrics()[HIT]
    out_second = run(second)
    after_second = server.metrics()[HIT]
    cold_first, cold_second = reference.greedy([first, second], 8)
    assert out_first == cold_first
    assert out_second == cold_second
    assert after_first == before  # nothing of this random prefix was cached before
    # Whole pages of the shared prefix are reused: at least all full pages but one (pages hold 16*dcp tokens).
    assert after_second - after_first >= PREFIX_LEN - 2 * 32
    assert server.metrics()["dcpserve_prefix_cache_hit_rate"] > 0
