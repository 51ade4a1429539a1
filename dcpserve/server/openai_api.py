"""/v1/completions, /v1/chat/completions and /v1/models in the OpenAI wire format."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dcpserve.server.chat import ChatTemplateError, Message
from dcpserve.server.detokenize import Delta
from dcpserve.server.errors import bad_request
from dcpserve.server.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                     ChatCompletionResponse, ChatMessageOut, CompletionChoice, CompletionChunk,
                                     CompletionRequest, CompletionResponse, DeltaMessage, ErrorResponse, ModelCard,
                                     ModelList, Usage)
from dcpserve.server.sampling import default_chat_max_tokens, openai_params
from dcpserve.server.serving import (RunningRequest, ServerContext, SSEResponse, new_id, run_to_completion,
                                     sse_events, start_request)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          503: {"model": ErrorResponse}}


def usage_of(run: RunningRequest) -> Usage:
    n_in, n_out = len(run.prompt_ids), len(run.processor.token_ids)
    return Usage(prompt_tokens=n_in, completion_tokens=n_out, total_tokens=n_in + n_out)


def completion_prompt_ids(ctx: ServerContext, req: CompletionRequest) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("batched prompts are not supported: send one prompt per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # Same encoding as the offline LLM: the tokenizer's own special-token handling (e.g. BOS).
        return ctx.encode_text(prompt, add_special_tokens=True, param="prompt")
    return list(prompt)


def check_completion_options(req: CompletionRequest) -> None:
    if req.echo:
        raise bad_request("echo is not supported", "echo")
    if req.logprobs is not None:
        raise bad_request("logprobs are not supported", "logprobs")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of not in (None, 1):
        raise bad_request("best_of must be 1", "best_of")


def chat_prompt_ids(ctx: ServerContext, req: ChatCompletionRequest) -> list[int]:
    if req.tools:
        raise bad_request("tool calling is not supported", "tools")
    if req.logprobs:
        raise bad_request("logprobs are not supported", "logprobs")
    messages = [Message(m.role, m.text(), m.reasoning_content) for m in req.messages]
    try:
        text = ctx.chat.render(messages, req.chat_template_kwargs)
    except ChatTemplateError as e:
        raise bad_request(str(e), "messages") from None
    # The template already wrote BOS and the role markers as text: no extra special tokens.
    return ctx.encode_text(text, add_special_tokens=False, param="messages")


def build_router(ctx: ServerContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=ctx.info.name, root=ctx.info.name, max_model_len=ctx.info.context_length)])

    @router.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        ctx.check_model(req.model)
        check_completion_options(req)
        prompt_ids = completion_prompt_ids(ctx, req)
        params, options = openai_params(req, ctx.info, COMPLETIONS_DEFAULT_MAX_TOKENS)
        run = await start_request(ctx, prompt_ids, params, options)
        rid, created = new_id("cmpl"), int(time.time())
        if req.stream:
            last = _usage_chunk(run, req, lambda u: CompletionChunk(id=rid, created=created, model=ctx.info.name,
                                                                    choices=[], usage=u))
            return SSEResponse(run, sse_events(run, _completion_chunker(ctx, req, rid, created), last=last))
        await run_to_completion(run, request)
        p = run.processor
        choice = CompletionChoice(text=p.text, finish_reason=p.finish_reason, stop_reason=p.stop_reason,
                                  token_ids=list(p.token_ids) if req.return_token_ids else None)
        return _json(CompletionResponse(id=rid, created=created, model=ctx.info.name, choices=[choice],
                                        usage=usage_of(run),
                                        prompt_token_ids=prompt_ids if req.return_token_ids else None))

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        ctx.check_model(req.model)
        prompt_ids = chat_prompt_ids(ctx, req)
        params, options = openai_params(req, ctx.info, default_chat_max_tokens(ctx.info, len(prompt_ids)))
        run = await start_request(ctx, prompt_ids, params, options)
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            opening = ChatCompletionChunk(id=rid, created=created, model=ctx.info.name, choices=[
                ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])
            last = _usage_chunk(run, req, lambda u: ChatCompletionChunk(id=rid, created=created, model=ctx.info.name,
                                                                        choices=[], usage=u))
            return SSEResponse(run, sse_events(run, _chat_chunker(ctx, req, rid, created),
                                               first=[opening.model_dump_json()], last=last))
        await run_to_completion(run, request)
        p = run.processor
        choice = ChatChoice(message=ChatMessageOut(content=p.text), finish_reason=p.finish_reason,
                            stop_reason=p.stop_reason, token_ids=list(p.token_ids) if req.return_token_ids else None)
        return _json(ChatCompletionResponse(id=rid, created=created, model=ctx.info.name, choices=[choice],
                                            usage=usage_of(run),
                                            prompt_token_ids=prompt_ids if req.return_token_ids else None))

    return router


def _json(model) -> JSONResponse:
    return JSONResponse(model.model_dump())


def _completion_chunker(ctx: ServerContext, req: CompletionRequest, rid: str, created: int):
    def chunks(d: Delta) -> list[str]:
        # One chunk per engine token, even when its text is still held back (partial UTF-8, a possible stop
        # string): clients and benchmarks time tokens by chunks.
        choice = CompletionChoice(text=d.text, finish_reason=d.finish_reason if d.finished else None,
                                  stop_reason=d.stop_reason, token_ids=d.token_ids if req.return_token_ids else None)
        return [CompletionChunk(id=rid, created=created, model=ctx.info.name, choices=[choice]).model_dump_json()]

    return chunks


def _chat_chunker(ctx: ServerContext, req: ChatCompletionRequest, rid: str, created: int):
    def chunks(d: Delta) -> list[str]:
        choice = ChatChunkChoice(delta=DeltaMessage(content=d.text),
                                 finish_reason=d.finish_reason if d.finished else None, stop_reason=d.stop_reason,
                                 token_ids=d.token_ids if req.return_token_ids else None)
        return [ChatCompletionChunk(id=rid, created=created, model=ctx.info.name, choices=[choice]).model_dump_json()]

    return chunks


def _usage_chunk(run: RunningRequest, req, make):
    def last() -> list[str]:
        if req.stream_options is None or not req.stream_options.include_usage:
            return []
        return [make(usage_of(run)).model_dump_json()]

    return last
