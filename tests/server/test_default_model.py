"""`serve` with no --model-path serves the embedded default model (shipped in the package, no download), and a
SIGTERM shuts the server down cleanly: exit code 0, no rank process left."""
from __future__ import annotations

import signal
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_default_model_serves_and_sigterm_exits_cleanly(launch, tmp_path):
    server = launch("server-default", embedded_default=True, dcp=2, api_key=None)
    client = server.openai()
    assert [m.id for m in client.models.list().data] == ["dcpserve-default"]
    r = client.chat.completions.create(model="dcpserve-default", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"

    ranks = [p for p in psutil.Process(server.proc.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log_tail()
    deadline = time.time() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    server.stop()
