"""Fixtures for the server tests: a tiny DeepSeek-V3.2 checkpoint, real server subprocesses
(`python -m dcpserve serve --tp 2 ...`, one per configuration, reused), and an offline reference engine.

Servers are session-scoped so the whole suite starts each configuration once; the ones a test destroys
(engine death) or configures oddly (tiny KV) are module-scoped in their own files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dcpserve.config import ModelConfig
from dcpserve.distributed.launcher import free_port
from dcpserve.loader.tiny import TINY_SPECIALS, TINY_V32_CONFIG, byte_tokenizer_json, random_weights, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-dcpserve-test"
CONTEXT_LENGTH = 512  # small, so "prompt longer than the context" is cheap to send
START_TIMEOUT_S = 240.0



class ServerProcess:
    """`python -m dcpserve serve` in a subprocess; its log goes to a file that failures print."""

    def __init__(self, model_path: str | None, log_path: Path, *, dcp: int, api_key: str | None = API_KEY,
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.port = free_port()
        self.api_key = api_key
        self._signalled = False
        self.log_path = log_path
        cmd = [sys.executable, "-m", "dcpserve", "serve", "--tp", "2", "--dcp", str(dcp), "--port", str(self.port),
               "--context-length", str(CONTEXT_LENGTH), *extra]
        if model_path is not None:  # None: the embedded default model
            cmd += ["--model-path", model_path]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self._wait_healthy()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_healthy(self) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base_url + path, headers=self.headers, timeout=60, **kw)

    def post(self, path: str, json=None, **kw) -> httpx.Response:
        kw.setdefault("headers", self.headers)
        return httpx.post(self.base_url + path, json=json, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        from dcpserve.server.metrics import parse_metrics

        return parse_metrics(self.get("/metrics").text)

    def openai(self, api_key: str | None = None):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key or self.api_key or "none",
                             max_retries=0, timeout=120)

    def async_openai(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key=self.api_key or "none", max_retries=0,
                                  timeout=120)

    def terminate(self) -> None:
        """Ask for a clean shutdown (SIGINT, once: a second one would make uvicorn skip its graceful path)."""
        if not self._signalled and self.proc.poll() is None:
            self._signalled = True
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        if self._log.closed:
            return
        self.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "tiny-v32"
    cfg = ModelConfig.from_dict(TINY_V32_CONFIG)
    write_checkpoint(str(path), TINY_V32_CONFIG, random_weights(cfg, seed=4321, gain=2.0))
    (path / "tokenizer.json").write_text(byte_tokenizer_json(cfg.vocab_size, TINY_SPECIALS))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tiny_ckpt):
    from dcpserve.engine.llm import load_tokenizer

    return load_tokenizer(tiny_ckpt)


@pytest.fixture(scope="session")
def launch(tiny_ckpt, tmp_path_factory):
    """`launch(name, dcp=..., extra=(...))` starts a server on the tiny checkpoint (or, with
    `embedded_default=True`, with no --model-path); all are stopped at the end of the session at the latest."""
    started: list[ServerProcess] = []

    def start(name: str, embedded_default: bool = False, **kw) -> ServerProcess:
        model_path = None if embedded_default else tiny_ckpt
        srv = ServerProcess(model_path, tmp_path_factory.mktemp("logs") / f"{name}.log", **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:  # signal all first, so they shut down in parallel
        srv.terminate()
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server_d2(launch) -> ServerProcess:
    return launch("server-d2", dcp=2)


@pytest.fixture(scope="session")
def server_d1(launch) -> ServerProcess:
    return launch("server-d1", dcp=1)


class Reference:
    """Greedy outputs of the offline engine (tp=2, dcp=2, no prefix cache: every run is cold), memoized."""

    def __init__(self, model_path: str):
        from dcpserve.engine.llm import LLM

        self.llm = LLM(model_path=model_path, tp=2, dcp=2, enable_prefix_caching=False, context_length=CONTEXT_LENGTH)
        self.cache: dict[tuple, list[int]] = {}

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        from dcpserve.engine.sampler import SamplingParams

        todo = [p for p in prompts if (tuple(p), max_tokens) not in self.cache]
        todo = list({tuple(p): p for p in todo}.values())
        if todo:
            outs = self.llm.generate(todo, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            for p, o in zip(todo, outs):
                self.cache[(tuple(p), max_tokens)] = o["output_ids"]
        return [self.cache[(tuple(p), max_tokens)] for p in prompts]


@pytest.fixture(scope="session")
def reference(tiny_ckpt) -> Iterator[Reference]:
    ref = Reference(tiny_ckpt)
    yield ref
    ref.llm.shutdown()
