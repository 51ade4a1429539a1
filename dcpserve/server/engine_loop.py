"""The engine thread: the only code that touches the LLMEngine once the server runs.

HTTP handlers (on the asyncio loop) send commands through a thread-safe queue: add a request (answered
through an asyncio future: accepted, or the engine's ValueError -> 400) and abort one. The thread runs
`engine.step()` while there is work, and hands each request's new tokens to its asyncio queue with one
`loop.call_soon_threadsafe` per step. If a rank dies (EngineDeadError) or the engine raises, every
in-flight request gets an ErrorEvent, new requests are refused, and `on_dead` is called so the server can
exit non-zero.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from dcpserve.engine.sampler import SamplingParams
from dcpserve.server.metrics import EngineGauges, ServerMetrics

log = logging.getLogger("dcpserve.server")

IDLE_POLL_S = 0.5  # how often an idle engine thread checks that the ranks are still alive


class EngineUnavailable(RuntimeError):
    """The engine is dead or shutting down (HTTP 503)."""


@dataclass
class TokenEvent:
    token_ids: list[int]
    finished: bool
    finish_reason: str | None


@dataclass
class ErrorEvent:
    message: str


Event = TokenEvent | ErrorEvent


class RequestHandle:
    """The HTTP side of one request: an asyncio queue the engine thread feeds."""

    def __init__(self, req_id: str, loop: asyncio.AbstractEventLoop):
        self.req_id = req_id
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.done = False  # set by the consumer once it saw the last event (no abort needed then)

    async def next(self) -> Event:
        ev = await self.queue.get()
        if isinstance(ev, ErrorEvent) or ev.finished:
            self.done = True
        return ev


@dataclass
class _Add:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    accepted: asyncio.Future


@dataclass
class _Abort:
    req_id: str
    reason: str  # "abort" (client gone) or "stop" (a stop string matched: a normal finish)


@dataclass
class _Live:
    handle: RequestHandle
    prompt_len: int
    arrival: float
    first_token: float | None = None
    num_out: int = 0


@dataclass
class _LogWindow:
    t: float = field(default_factory=time.monotonic)
    prefill: int = 0
    generated: int = 0


class EngineLoop:
    def __init__(self, engine, metrics: ServerMetrics, log_interval_s: float = 5.0):
        self.engine = engine
        self.metrics = metrics
        self.log_interval_s = log_interval_s
        self.on_dead: Callable[[str], None] | None = None
        self.dead_reason: str | None = None
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()  # orders "check dead, enqueue" against "mark dead, drain"
        self._stop = threading.Event()
        self._window = _LogWindow()
        self._thread = threading.Thread(target=self._run, name="dcpserve-engine", daemon=True)

    # -- HTTP side (asyncio loop) ---------------------------------------------------------------------
    def start(self) -> None:
        self._publish()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.dead_reason is None and not self._stop.is_set()

    async def submit(self, prompt_ids: list[int], params: SamplingParams, req_id: str | None = None) -> RequestHandle:
        """Queue a request; returns once the engine accepted it. Raises ValueError (bad request) or
        EngineUnavailable."""
        loop = asyncio.get_running_loop()
        handle = RequestHandle(req_id or uuid.uuid4().hex, loop)
        accepted = loop.create_future()
        with self._lock:
            if not self.healthy:
                raise EngineUnavailable(self.dead_reason or "server is shutting down")
            self._cmds.put(_Add(handle, prompt_ids, params, time.monotonic(), accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(handle.req_id)  # the client left while we waited: don't run it
            raise
        return handle

    def abort(self, req_id: str, reason: str = "abort") -> None:
        """Thread-safe; frees the request's KV on the next engine-thread iteration (before the next step)."""
        self._cmds.put(_Abort(req_id, reason))

    # -- engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - a dead engine thread must never leave requests hanging
            log.exception("engine thread failed")
            self._die(f"engine thread failed: {type(e).__name__}: {e}")

    def _serve(self) -> None:
        from dcpserve.distributed.launcher import EngineDeadError

        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            if not self._drain(block=not busy):
                break
            if not self.engine.has_unfinished():
                if not self._ranks_alive():
                    self._die("a rank process exited while the engine was idle")
                    return
                self._publish()
                continue
            try:
                outs = self.engine.step()
            except EngineDeadError as e:
                self._die(str(e))
                return
            except Exception as e:  # noqa: BLE001 - an engine bug leaves its state unknown: stop serving
                log.exception("engine step failed")
                self._die(f"engine step failed: {type(e).__name__}: {e}")
                return
            self._dispatch(outs)
            self._publish()
            self._maybe_log()

    def _drain(self, block: bool) -> bool:
        """Run queued commands; with `block`, wait a little for the first. False: stop requested."""
        try:
            cmd = self._cmds.get(timeout=IDLE_POLL_S) if block else self._cmds.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is None:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                self._abort(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        h = cmd.handle
        try:
            self.engine.add_request(h.req_id, cmd.prompt_ids, cmd.params)
        except Exception as e:  # noqa: BLE001 - ValueError is the client's fault (400); anything else fails
            _resolve(cmd.accepted, e)  # this request only (500), the engine state is untouched
            return
        self._live[h.req_id] = _Live(h, len(cmd.prompt_ids), cmd.arrival)
        _resolve(cmd.accepted, None)

    def _abort(self, cmd: _Abort) -> None:
        live = self._live.pop(cmd.req_id, None)
        if live is None:
            return  # already finished
        self.engine.abort(cmd.req_id)
        if cmd.reason == "stop":
            self._record_finish(live, "stop", time.monotonic())
        else:
            self.metrics.on_abort()

    def _dispatch(self, outs) -> None:
        now = time.monotonic()
        batch: list[tuple[RequestHandle, Event]] = []
        generated = 0
        for out in outs:
            live = self._live.get(out.req_id)
            if live is None:
                continue  # aborted after the step was scheduled
            if live.first_token is None:
                live.first_token = now
                self.metrics.on_first_token(now - live.arrival, live.prompt_len)
            live.num_out += len(out.new_token_ids)
            generated += len(out.new_token_ids)
            if out.finished:
                del self._live[out.req_id]
                self._record_finish(live, out.finish_reason or "stop", now)
            batch.append((live.handle, TokenEvent(list(out.new_token_ids), out.finished, out.finish_reason)))
        self.metrics.on_tokens(generated)
        self._window.generated += generated
        _deliver(batch)

    def _record_finish(self, live: _Live, reason: str, now: float) -> None:
        tpot = None
        if live.first_token is not None and live.num_out > 1:
            tpot = (now - live.first_token) / (live.num_out - 1)
        self.metrics.on_finish(reason, now - live.arrival, tpot)

    def _publish(self) -> None:
        e = self.engine
        st = e.allocator.stats
        self.metrics.publish(EngineGauges(
            running=len(e.scheduler.running), waiting=len(e.scheduler.waiting), kv_usage=e.kv_usage(),
            prefix_hit_tokens=st.hit_tokens, prefix_queried_tokens=st.queried_tokens,
            prefill_tokens=e.stats.prefill_tokens, steps=e.stats.steps, healthy=self.dead_reason is None))

    def _maybe_log(self) -> None:
        now = time.monotonic()
        w = self._window
        dt = now - w.t
        if dt < self.log_interval_s:
            return
        e = self.engine
        prefill = e.stats.prefill_tokens
        log.info("running: %d reqs, waiting: %d reqs, KV usage: %.1f%%, prefix-cache hit rate: %.1f%%, "
                 "prompt throughput: %.1f tok/s, generation throughput: %.1f tok/s",
                 len(e.scheduler.running), len(e.scheduler.waiting), 100 * e.kv_usage(),
                 100 * e.allocator.stats.hit_rate, (prefill - w.prefill) / dt, w.generated / dt)
        self._window = _LogWindow(now, prefill, 0)

    def _ranks_alive(self) -> bool:
        return self.engine.alive()

    def _die(self, reason: str) -> None:
        log.error("engine died: %s", reason)
        with self._lock:
            self.dead_reason = reason
        message = f"engine died: {reason}"
        batch: list[tuple[RequestHandle, Event]] = [(live.handle, ErrorEvent(message)) for live in self._live.values()]
        self._live.clear()
        _deliver(batch)
        while True:  # commands queued before the flag was set still wait for an answer
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                _resolve(cmd.accepted, EngineUnavailable(message))
        self._publish()
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - already dead; we only want the ranks gone
            log.exception("error while shutting down the dead engine")
        if self.on_dead is not None:
            self.on_dead(reason)


def _resolve(fut: asyncio.Future, error: BaseException | None) -> None:
    def set_() -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    try:
        fut.get_loop().call_soon_threadsafe(set_)
    except RuntimeError:
        pass  # the loop is closed: the server is shutting down


def _deliver(batch: list[tuple[RequestHandle, Event]]) -> None:
    """One call_soon_threadsafe per event loop per step, not per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Event]]] = {}
    for handle, ev in batch:
        by_loop.setdefault(handle.loop, []).append((handle, ev))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            pass  # the loop is closed: the server is shutting down


def _put_all(items: list[tuple[RequestHandle, Event]]) -> None:
    for handle, ev in items:
        handle.queue.put_nowait(ev)
