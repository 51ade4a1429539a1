"""The native endpoint, SGLang-style: `POST /generate` with `input_ids` (or `text`) and `sampling_params`;
answers `{"text", "output_ids", "meta_info"}`. Streaming sends the same object, cumulative, per token."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dcpserve.server.errors import bad_request
from dcpserve.server.protocol import ErrorResponse, FinishReason, GenerateMeta, GenerateRequest, GenerateResponse
from dcpserve.server.sampling import native_params
from dcpserve.server.serving import (RunningRequest, ServerContext, SSEResponse, new_id, run_to_completion,
                                     sse_events, start_request)


def native_prompt_ids(ctx: ServerContext, req: GenerateRequest) -> list[int]:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("pass exactly one of `text` and `input_ids`", "input_ids")
    if req.text is not None:
        return ctx.encode_text(req.text, add_special_tokens=True, param="text")
    return list(req.input_ids or [])


def build_native_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.post("/generate", response_model=GenerateResponse,
                 responses={400: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
    async def generate(req: GenerateRequest, request: Request):
        prompt_ids = native_prompt_ids(ctx, req)
        params, options = native_params(req.sampling_params, ctx.info)
        rid = req.rid or new_id("gen")
        if not rid.isprintable() or len(rid) > 256 or not _utf8(rid):
            raise bad_request("rid must be printable text of at most 256 characters", "rid")
        t0 = time.monotonic()
        run = await start_request(ctx, prompt_ids, params, options)
        if req.stream:
            return SSEResponse(run, sse_events(run, lambda d: [_result(run, rid, t0).model_dump_json()]))
        await run_to_completion(run, request)
        return JSONResponse(_result(run, rid, t0).model_dump())

    return router


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _result(run: RunningRequest, rid: str, t0: float) -> GenerateResponse:
    p = run.processor
    reason = FinishReason(type=p.finish_reason, matched=p.stop_reason) if p.finished else None
    meta = GenerateMeta(id=rid, prompt_tokens=len(run.prompt_ids), completion_tokens=len(p.token_ids),
                        finish_reason=reason, e2e_latency=time.monotonic() - t0)
    return GenerateResponse(text=p.emitted_text, output_ids=list(p.token_ids), meta_info=meta)
