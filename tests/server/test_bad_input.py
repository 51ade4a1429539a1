"""Bad input never reaches the engine and never gets a 5xx: a 4xx with an OpenAI-style error body that says
why. Then schemathesis fuzzes every operation of /openapi.json (bounded) and finds no 5xx."""
from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

CONTEXT_LENGTH = 512  # the servers' --context-length (conftest.py)

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

# (name, path, raw body or JSON object, expected status, a word the reason must contain)
CASES = [
    ("malformed JSON", COMP, b'{"prompt": "x", ', 400, "json"),
    ("body not an object", COMP, b"[1, 2]", 400, "object"),
    ("lone surrogate in prompt", COMP, b'{"prompt": "a\\ud800b"}', 400, "unicode"),
    ("lone surrogate in chat", CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "unicode"),
    ("NaN temperature", COMP, b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("max_tokens as string", COMP, {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("prompt as number", COMP, {"prompt": 5}, 400, "prompt"),
    ("messages as string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("temperature as string", CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("stream as string", COMP, {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("negative max_tokens", COMP, {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", COMP, {"prompt": "x", "max_tokens": 10 ** 9}, 400, "context length"),
    ("astronomic max_tokens", CHAT, {"messages": USER, "max_tokens": 2 ** 80}, 400, "context length"),
    ("huge max_completion_tokens", CHAT, {"messages": USER, "max_completion_tokens": 10 ** 6}, 400, "context length"),
    ("prompt longer than context", COMP, {"prompt": [7] * (CONTEXT_LENGTH + 10), "max_tokens": 1}, 400,
     "context length"),
    ("chat longer than context", CHAT, {"messages": [{"role": "user", "content": "a" * (CONTEXT_LENGTH + 10)}]},
     400, "no room"),
    ("empty prompt", COMP, {"prompt": "", "max_tokens": 4}, 400, "empty"),
    ("empty id prompt", COMP, {"prompt": [], "max_tokens": 4}, 400, "empty"),
    ("empty messages", CHAT, {"messages": []}, 400, "empty"),
    ("token id out of range", COMP, {"prompt": [1, 2, 100000]}, 400, "out of range"),
    ("negative token id", COMP, {"prompt": [1, -2]}, 400, "out of range"),
    ("n > 1", COMP, {"prompt": "x", "n": 2}, 400, "n must be 1"),
    ("batched prompts", COMP, {"prompt": ["a", "b"]}, 400, "batched"),
    ("negative temperature", COMP, {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p zero", COMP, {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_k negative", COMP, {"prompt": "x", "top_k": -5}, 400, "top_k"),
    ("empty stop string", COMP, {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("logprobs", COMP, {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tool"),
    ("unknown model", COMP, {"prompt": "x", "model": "gpt-17"}, 404, "not found"),
    ("unknown model (chat)", CHAT, {"messages": USER, "model": "gpt-17"}, 404, "not found"),
    ("native: both text and ids", "/generate", {"text": "x", "input_ids": [1]}, 400, "exactly one"),
    ("native: negative max_new_tokens", "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": -3}},
     400, "max_new_tokens"),
]


@pytest.mark.parametrize("name,path,body,status,reason", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_4xx_with_reason(server_d2, name, path, body, status, reason):
    kw = {"content": body, "headers": {**server_d2.headers, "Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = server_d2.post(path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["type"]
    assert reason.lower() in err["message"].lower(), err


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_wrong_api_key_is_401(server_d2, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for path, body in ((COMP, {"prompt": "x"}), (CHAT, {"messages": USER}), ("/generate", {"input_ids": [1]})):
        r = httpx.post(server_d2.base_url + path, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server_d2.base_url + "/v1/models", headers=headers, timeout=30).status_code == 401


def test_engine_survives_bad_input(server_d2):
    assert server_d2.get("/health").json() == {"status": "ok"}
    r = server_d2.post(COMP, {"prompt": [5, 6], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# -- schemathesis ------------------------------------------------------------------------------------
MAX_EXAMPLES = 12
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")


def _bound_generation(body) -> None:
    """Valid requests may ask for hundreds of tokens (chat defaults to the rest of the context), which takes
    long on CPU: cap positive lengths and fill in a small one where none is given. Bad values (negative, of
    the wrong type) pass through untouched, so they are still fuzzed."""
    if not isinstance(body, dict):
        return
    if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    if isinstance(body.get("sampling_params"), dict):
        body["sampling_params"].setdefault("max_new_tokens", 4)
    elif "input_ids" in body or "text" in body:
        body.setdefault("sampling_params", {"max_new_tokens": 4})
    for key, value in list(body.items()):
        if key in TOKEN_FIELDS and isinstance(value, int) and not isinstance(value, bool) and value > 4:
            body[key] = 4
        elif isinstance(value, dict):
            _bound_generation(value)


def test_schemathesis_finds_no_5xx(server_d2):
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase

    base = server_d2.base_url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    failures: list[str] = []
    tried: set[str] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            strategy = operation.as_strategy(generation_mode=mode)

            @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                                 phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @hypothesis.given(case=strategy)
            def check(case) -> None:
                _bound_generation(case.body)
                response = case.call(base_url=base, headers=server_d2.headers, timeout=60)
                tried.add(f"{case.method} {case.path}")
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                                    f"{response.text[:300]}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                pass  # e.g. no negative examples exist for a GET without parameters
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /generate"} <= tried
    assert not failures, "\n".join(failures[:10])
    assert server_d2.get("/health").status_code == 200
