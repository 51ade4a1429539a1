"""A rank process killed mid-run: in-flight requests (streaming and not) fail with an error, /health stops
saying ok, and the server process exits non-zero within 30 s. No hang."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

pytestmark = pytest.mark.slow

EXIT_DEADLINE_S = 30.0


def rank_processes(pid: int) -> list[psutil.Process]:
    """The server's rank processes: its multiprocessing-spawned children (not the resource tracker)."""
    kids = psutil.Process(pid).children()
    return [p for p in kids if "spawn_main" in " ".join(p.cmdline())]


def test_killed_rank_fails_requests_and_exits_nonzero(launch):
    server = launch("server-doomed", dcp=2)
    client = server.openai()
    model = client.models.list().data[0].id
    outcomes: dict[str, object] = {}
    progress = {"stream": 0}

    def streaming() -> None:
        try:
            stream = client.completions.create(model=model, prompt="doomed", max_tokens=400, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            for _ in stream:
                progress["stream"] += 1
            outcomes["stream"] = "completed"
        except openai.APIError as e:
            outcomes["stream"] = e

    def blocking() -> None:
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "doomed"}],
                                           max_tokens=400, temperature=0, extra_body={"ignore_eos": True})
            outcomes["blocking"] = "completed"
        except openai.APIError as e:
            outcomes["blocking"] = e

    threads = [threading.Thread(target=streaming), threading.Thread(target=blocking)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while progress["stream"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert progress["stream"] >= 3, server.log_tail()
    ranks = rank_processes(server.proc.pid)
    assert len(ranks) == 2, [p.cmdline() for p in ranks]

    killed_at = time.time()
    ranks[-1].send_signal(signal.SIGKILL)
    for t in threads:
        t.join(EXIT_DEADLINE_S)
    assert not any(t.is_alive() for t in threads), "a request hung after the rank died"
    for name in ("stream", "blocking"):
        assert isinstance(outcomes[name], openai.APIError), (name, outcomes[name])
        assert "engine died" in str(outcomes[name]) or "rank" in str(outcomes[name]), outcomes[name]

    try:
        code = server.proc.wait(max(0.0, EXIT_DEADLINE_S - (time.time() - killed_at)))
    except Exception:
        pytest.fail(f"server still running {EXIT_DEADLINE_S} s after a rank died:\n{server.log_tail()}")
    assert code != 0
    assert time.time() - killed_at < EXIT_DEADLINE_S
    assert "engine died" in server.log_tail(200)
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.base_url + "/health", timeout=2)
    # The surviving rank is gone too (no orphans).
    deadline = time.time() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
