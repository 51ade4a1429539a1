"""The OpenAI-compatible API through the `openai` client against real servers (tp=2, dcp=2 and dcp=1):
greedy outputs equal the offline engine's and each other; streaming equals non-streaming; chat encoding;
stop strings and stop tokens; the native /generate; auth."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from dcpserve.server.chat import ASSISTANT, BOS, THINK_END, THINK_START, USER

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "DeepSeek decode context parallelism", "héllo wörld ✓ 日本語", "1 2 3 4 5 6 7 8"]
MAX_TOKENS = 12


def complete(server, prompt, max_tokens=MAX_TOKENS, **extra):
    body = {"ignore_eos": True, "return_token_ids": True, **extra}
    return server.openai().completions.create(model=_model(server), prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, extra_body=body)


def _model(server) -> str:
    return server.openai().models.list().data[0].id


def token_ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def test_models_endpoint(server_d2, tiny_ckpt):
    models = server_d2.openai().models.list().data
    assert [m.id for m in models] == [tiny_ckpt]
    assert models[0].model_extra["max_model_len"] == 512


def test_completions_equal_offline_and_across_dcp(server_d2, server_d1, reference, tokenizer):
    ids = [tokenizer.encode(p).ids for p in PROMPTS]
    expected = reference.greedy(ids, MAX_TOKENS)
    for server in (server_d2, server_d1):
        for prompt, prompt_ids, exp in zip(PROMPTS, ids, expected):
            r = complete(server, prompt)
            choice = r.choices[0]
            assert token_ids(choice) == exp, (server.base_url, prompt)
            assert choice.text == tokenizer.decode(exp)
            assert choice.finish_reason == "length"
            assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == MAX_TOKENS
            assert r.model_extra["prompt_token_ids"] == prompt_ids


def test_completions_token_id_prompt(server_d2, reference):
    prompt = [7, 100, 250, 33, 480, 12, 5]
    r = complete(server_d2, prompt, max_tokens=10)
    assert token_ids(r.choices[0]) == reference.greedy([prompt], 10)[0]


def test_streaming_equals_non_streaming(server_d2, tokenizer, reference):
    prompt = PROMPTS[2]
    exp = reference.greedy([tokenizer.encode(prompt).ids], MAX_TOKENS)[0]
    stream = server_d2.openai().completions.create(
        model=_model(server_d2), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert len(content) == MAX_TOKENS  # one chunk per token
    assert [t for c in content for t in c.choices[0].model_extra["token_ids"]] == exp
    assert "".join(c.choices[0].text for c in content) == tokenizer.decode(exp)
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and not chunks[-1].choices


def test_incremental_detokenization_never_splits_utf8(server_d2):
    # The prompt's multi-byte characters are split over byte tokens; a forced continuation must not emit
    # broken characters either: every streamed piece is valid text, without U+FFFD unless the model made it.
    stream = server_d2.openai().completions.create(model=_model(server_d2), prompt="日本語 ✓", max_tokens=24,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) == 24
    for p in pieces:
        p.encode("utf-8")  # raises on lone surrogates


def expected_chat_prompt(tokenizer, system: str, user: str, thinking: bool) -> list[int]:
    text = BOS + system + USER + user + ASSISTANT + (THINK_START if thinking else THINK_END)
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_encoding_and_output(server_d2, tokenizer, reference, thinking):
    system, user = "You are terse.", "What is DCP?"
    r = server_d2.openai().chat.completions.create(
        model=_model(server_d2), messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "chat_template_kwargs": {"thinking": thinking}})
    prompt_ids = expected_chat_prompt(tokenizer, system, user, thinking)
    assert r.model_extra["prompt_token_ids"] == prompt_ids
    assert prompt_ids[0] == 0 and tokenizer.decode(prompt_ids[-1:], skip_special_tokens=False) == (
        THINK_START if thinking else THINK_END)
    exp = reference.greedy([prompt_ids], MAX_TOKENS)[0]
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == exp
    assert choice.message.role == "assistant" and choice.message.content == tokenizer.decode(exp)
    assert r.usage.prompt_tokens == len(prompt_ids)


def test_chat_streaming(server_d2):
    client = server_d2.openai()
    msgs = [{"role": "user", "content": "stream me"}]
    full = client.chat.completions.create(model=_model(server_d2), messages=msgs, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=_model(server_d2), messages=msgs, max_tokens=10,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_max_completion_tokens_alias(server_d2):
    r = server_d2.openai().chat.completions.create(model=_model(server_d2), messages=[{"role": "user", "content": "x"}],
                                                   max_completion_tokens=3, temperature=0,
                                                   extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


def test_stop_string_truncates(server_d2, tokenizer, reference):
    # Find a prompt whose greedy text is long enough to hold a stop string in its middle.
    for prompt in PROMPTS:
        exp = reference.greedy([tokenizer.encode(prompt).ids], 24)[0]
        text = tokenizer.decode(exp)
        if len(text) >= 6:
            break
    else:
        pytest.skip("no greedy output with enough text")
    stop = text[3:5]
    cut = text[: text.find(stop)]
    r = server_d2.openai().completions.create(model=_model(server_d2), prompt=prompt, max_tokens=24, temperature=0,
                                              stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    stream = server_d2.openai().completions.create(model=_model(server_d2), prompt=prompt, max_tokens=24,
                                                   temperature=0, stop=stop, stream=True,
                                                   extra_body={"ignore_eos": True})
    pieces = [c.choices[0] for c in stream if c.choices]
    assert "".join(p.text for p in pieces) == cut and pieces[-1].finish_reason == "stop"
    # The request is freed once the stop string matched (the abort reaches the engine within a step or two).
    deadline = time.time() + 10
    while server_d2.metrics()["dcpserve_num_requests_running"] != 0:
        assert time.time() < deadline, "request still running after its stop string matched"
        time.sleep(0.05)


def test_stop_token_ids(server_d2, reference):
    prompt = [9, 8, 7, 6, 5, 40, 41]
    exp = reference.greedy([prompt], 16)[0]
    stop_tok = exp[4]
    first = exp.index(stop_tok)
    r = complete(server_d2, prompt, max_tokens=16, stop_token_ids=[stop_tok])
    assert token_ids(r.choices[0]) == exp[: first + 1]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop_tok


def test_seeded_sampling_is_reproducible(server_d2):
    client, model = server_d2.openai(), _model(server_d2)

    def sample(seed: int) -> list[int]:
        r = client.completions.create(model=model, prompt=[3, 4, 5], max_tokens=16, temperature=1.0, top_p=0.9,
                                      seed=seed, extra_body={"top_k": 50, "ignore_eos": True, "return_token_ids": True})
        return token_ids(r.choices[0])

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c


def test_native_generate(server_d2, reference):
    prompt = [11, 22, 33, 44, 55]
    exp = reference.greedy([prompt], 8)[0]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
    r = server_d2.post("/generate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output_ids"] == exp
    assert out["meta_info"]["finish_reason"]["type"] == "length" and out["meta_info"]["completion_tokens"] == 8
    with httpx.stream("POST", server_d2.base_url + "/generate", json={**body, "stream": True},
                      headers=server_d2.headers, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["output_ids"] == exp and len(events) == 8  # cumulative, one event per token


def test_api_key_required(server_d2):
    no_key = httpx.post(server_d2.base_url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert no_key.status_code == 401 and "API key" in no_key.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        server_d2.openai(api_key="wrong").completions.create(model=_model(server_d2), prompt="x", max_tokens=1)
    assert httpx.get(server_d2.base_url + "/health", timeout=30).status_code == 200  # health needs no key
    assert httpx.get(server_d2.base_url + "/metrics", timeout=30).status_code == 200


def wait_no_running(server, timeout: float) -> float:
    t0 = time.time()
    while server.metrics()["dcpserve_num_requests_running"] + server.metrics()["dcpserve_num_requests_waiting"]:
        assert time.time() - t0 < timeout, "request still in the engine after the client disconnected"
        time.sleep(0.05)
    return time.time() - t0


@pytest.mark.parametrize("chunks_before_close", [0, 3])
def test_stream_disconnect_aborts_at_once(server_d2, chunks_before_close):
    # 400 tokens take many seconds; an abort must free the request within a couple of steps.
    body = {"prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server_d2.base_url + "/v1/completions", json=body, headers=server_d2.headers,
                      timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if seen >= chunks_before_close:
                break
            seen += line.startswith("data: {")
    wait_no_running(server_d2, timeout=5)
    assert server_d2.metrics()['dcpserve_kv_cache_usage_perc{rank="1"}'] == 0


def test_non_streaming_disconnect_aborts_at_once(server_d2):
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server_d2.base_url + "/v1/chat/completions", json=body, headers=server_d2.headers, timeout=1.0)
    wait_no_running(server_d2, timeout=5)
