"""What every generation endpoint shares: the server context, starting a request on the engine thread,
reading its text deltas, aborting it when the client goes away, and the SSE response."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from dcpserve.engine.sampler import SamplingParams
from dcpserve.server.chat import ChatFormatter
from dcpserve.server.detokenize import Delta, OutputProcessor
from dcpserve.server.engine_loop import EngineLoop, EngineUnavailable, ErrorEvent
from dcpserve.server.errors import APIError, bad_request, error_body
from dcpserve.server.metrics import ServerMetrics
from dcpserve.server.sampling import ModelInfo, OutputOptions


class EngineFailure(RuntimeError):
    """The engine died while this request ran (a server fault: 500 / SSE error event)."""


class ClientDisconnected(Exception):
    """The HTTP client went away before the request finished."""


CLIENT_GONE = ErrorEvent("client disconnected")  # queued by the disconnect watcher to wake the consumer


@dataclass
class ServerContext:
    loop: EngineLoop
    tokenizer: object | None  # tokenizers.Tokenizer
    chat: ChatFormatter
    info: ModelInfo
    metrics: ServerMetrics
    api_key: str | None = None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.info.name:
            raise APIError(404, f"model {model!r} not found; this server serves {self.info.name!r} (see /v1/models)",
                           "model")

    def encode_text(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer.json: send token ids instead of text", param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); the tokenizer would crash on them
            raise bad_request(f"{param} is not valid Unicode text (lone surrogate)", param) from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids


class RunningRequest:
    """One request on the engine: pull text deltas, release (abort) when the consumer stops early."""

    def __init__(self, ctx: ServerContext, handle, processor: OutputProcessor, prompt_ids: list[int]):
        self.ctx = ctx
        self.handle = handle
        self.processor = processor
        self.prompt_ids = prompt_ids

    @property
    def req_id(self) -> str:
        return self.handle.req_id

    async def next_delta(self) -> Delta:
        ev = await self.handle.next()
        if ev is CLIENT_GONE:
            raise ClientDisconnected()
        if isinstance(ev, ErrorEvent):
            raise EngineFailure(ev.message)
        delta = self.processor.process(ev.token_ids, ev.finished, ev.finish_reason)
        if delta.finished and not ev.finished:
            # A stop string matched: the engine is still generating this request. Free it now.
            self.handle.done = True
            self.ctx.loop.abort(self.req_id, "stop")
        return delta

    def release(self) -> None:
        if not self.handle.done:
            self.handle.done = True
            self.ctx.loop.abort(self.req_id)

    async def deltas(self) -> AsyncIterator[Delta]:
        while True:
            delta = await self.next_delta()
            yield delta
            if delta.finished:
                return


async def start_request(ctx: ServerContext, prompt_ids: list[int], params: SamplingParams, options: OutputOptions,
                        req_id: str | None = None) -> RunningRequest:
    try:
        handle = await ctx.loop.submit(prompt_ids, params, req_id)
    except ValueError as e:  # the engine's admission checks: empty prompt, token range, length, capacity
        raise bad_request(str(e)) from None
    except EngineUnavailable as e:
        raise APIError(503, f"engine unavailable: {e}") from None
    processor = OutputProcessor(ctx.tokenizer, options.stop, params.stop_token_ids, options.include_stop,
                                options.skip_special_tokens)
    return RunningRequest(ctx, handle, processor, prompt_ids)


async def wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_to_completion(run: RunningRequest, request: Request) -> None:
    """Non-streaming: consume every delta; abort at once if the client disconnects meanwhile."""

    async def watch() -> None:
        await wait_disconnect(request)
        run.release()  # abort first: frees the KV even before the consumer wakes up
        run.handle.queue.put_nowait(CLIENT_GONE)

    watcher = asyncio.create_task(watch())
    try:
        async for _ in run.deltas():
            pass
    except EngineFailure as e:
        raise APIError(500, str(e), type_="engine_error") from None
    except ClientDisconnected:
        raise APIError(499, "client disconnected") from None  # nobody reads it; ends the handler cleanly
    finally:
        watcher.cancel()
        run.release()


def sse(data: str) -> str:
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_events(run: RunningRequest, make_chunks: Callable[[Delta], list[str]],
                     first: list[str] | None = None, last: Callable[[], list[str]] | None = None) -> AsyncIterator[str]:
    """The SSE body: optional opening events, one or more events per delta, closing events, [DONE]. An engine
    failure becomes an error event. Leaving early (client gone: the task is cancelled) aborts the request."""
    try:
        for chunk in first or []:
            yield sse(chunk)
        async for delta in run.deltas():
            for chunk in make_chunks(delta):
                yield sse(chunk)
        for chunk in (last() if last else []):
            yield sse(chunk)
    except EngineFailure as e:
        yield sse(json.dumps(error_body(500, str(e), type_="engine_error")))
    finally:
        run.release()
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """Server-sent events that always watch for the client going away (Starlette only does so for ASGI
    servers older than spec 2.4), so a closed stream aborts its request at once, not at the next token."""

    media_type = "text/event-stream"

    def __init__(self, run: RunningRequest, content: AsyncIterator[str]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # client gone mid-write
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            # The body generator's own cleanup never runs if it was not started before the client left.
            self.run.release()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
