"""The HTTP server: `python -m dcpserve serve` ends up in `run_server`.

Start-up order: load the engine (rank processes, weights, KV pool) first, so a bad flag or checkpoint fails
before the port opens and /health only answers once requests can run; then start the engine thread and
uvicorn. If the engine dies, requests in flight get an error, /health turns 503, and the process exits
non-zero (uvicorn shuts down gracefully; a timer forces the exit if that takes too long).
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import signal
import threading

from dcpserve.config import ConfigError, EngineArgs

try:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as e:  # the CLI prints ConfigError as one line instead of a traceback
    raise ConfigError(f"`serve` needs the server extras ({e.name} is missing): pip install -e '.[serve]'") from None

from dcpserve.server.chat import ChatFormatter
from dcpserve.server.engine_loop import EngineLoop
from dcpserve.server.errors import error_body, error_response, install_error_handlers
from dcpserve.server.metrics import ServerMetrics
from dcpserve.server.native import build_native_router
from dcpserve.server.openai_api import build_router
from dcpserve.server.protocol import HealthResponse
from dcpserve.server.sampling import ModelInfo
from dcpserve.server.serving import ServerContext

log = logging.getLogger("dcpserve.server")

DEFAULT_MODEL_NAME = "dcpserve-default"
EXIT_BACKSTOP_S = 15.0  # after the engine dies, force the exit if graceful shutdown has not finished
PROTECTED_PREFIXES = ("/v1/", "/generate")


class BearerAuth:
    """`--api-key`: every inference endpoint needs `Authorization: Bearer <key>`. A pure ASGI middleware
    (not BaseHTTPMiddleware), so streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES) and scope["method"] != "OPTIONS":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                message = "missing API key" if not got else "invalid API key"
                body = json.dumps(error_body(401, f"{message}: send 'Authorization: Bearer <key>'")).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class JSONBodies:
    """Read POST bodies as JSON whatever the Content-Type says: `curl -d '{...}'` sends form encoding, and
    FastAPI would then reject a perfectly good JSON body."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
            if b"json" not in ctype:
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def build_app(ctx: ServerContext) -> FastAPI:
    app = FastAPI(title="dcpserve", version="0.1.0",
                  description="OpenAI-compatible server for DeepSeek MLA models with decode context parallelism")
    install_error_handlers(app)
    app.include_router(build_router(ctx))
    app.include_router(build_native_router(ctx))

    @app.get("/health", response_model=HealthResponse)
    async def health():
        if not ctx.loop.healthy:
            return error_response(503, f"engine unhealthy: {ctx.loop.dead_reason or 'shutting down'}")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    _document_400_not_422(app)
    app.add_middleware(JSONBodies)
    if ctx.api_key:
        app.add_middleware(BearerAuth, api_key=ctx.api_key)  # added last = runs first
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every body; this server answers validation errors with 400."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", {"description": "Bad Request", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        return app.openapi_schema

    app.openapi = openapi


def served_model_name(args: EngineArgs) -> str:
    # Same rule as SGLang/vLLM: the name clients send is --served-model-name, else the --model-path given.
    return args.served_model_name or args.model_path or DEFAULT_MODEL_NAME


def build_context(args: EngineArgs, engine) -> ServerContext:
    from dcpserve.engine.llm import load_tokenizer

    name = served_model_name(args)
    tokenizer = load_tokenizer(engine.args.model_path)
    if tokenizer is None:
        log.warning("no tokenizer.json in %s: only token-id prompts will work", engine.args.model_path)
    info = ModelInfo(name=name, vocab_size=engine.cfg.vocab_size, context_length=engine.context_length,
                     capacity_tokens=engine.capacity_tokens, has_tokenizer=tokenizer is not None)
    metrics = ServerMetrics(engine.args.tp, engine.capacity_tokens)
    return ServerContext(EngineLoop(engine, metrics), tokenizer, ChatFormatter.from_model_path(engine.args.model_path),
                         info, metrics, args.api_key)


def run_server(args: EngineArgs) -> int:
    """Serve until interrupted (exit code 0) or until the engine dies (exit code 1)."""
    import uvicorn

    from dcpserve.engine.llm_engine import LLMEngine

    name = served_model_name(args)  # before the engine fills in the default model path
    engine = LLMEngine(args)
    args.served_model_name = name
    ctx = build_context(args, engine)
    config = uvicorn.Config(build_app(ctx), host=args.host, port=args.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    ctx.loop.on_dead = lambda reason: _exit_soon(server)
    try:
        ctx.loop.start()
        log.info("serving %r (tp=%d dcp=%d, context %d, KV capacity %d tokens) on http://%s:%d", name, args.tp,
                 args.dcp, ctx.info.context_length, ctx.info.capacity_tokens, args.host, args.port)
        previous = _quiet_signals()
        try:
            server.run()
        finally:
            _restore_signals(previous)
    finally:
        ctx.loop.stop()
        engine.shutdown()
    if ctx.loop.dead_reason is not None:
        log.error("exiting: the engine died (%s)", ctx.loop.dead_reason)
        return 1
    return 0


def _quiet_signals() -> dict:
    """uvicorn re-raises the signal that stopped it once it has shut down (SIGTERM would then kill us before
    the ranks are stopped). With no-op handlers underneath, `server.run()` just returns and we clean up."""
    return {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _exit_soon(server) -> None:
    server.should_exit = True
    timer = threading.Timer(EXIT_BACKSTOP_S, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
