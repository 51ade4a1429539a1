"""OpenAI-style errors: every 4xx and 5xx body is `{"error": {"message", "type", "param", "code"}}`.

FastAPI answers validation problems with 422 and its own body; OpenAI clients expect 400 and the error
object, so the handlers below translate them, and Starlette's own 404/405 too."""
from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dcpserve.server.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("dcpserve.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised by handlers; becomes an OpenAI-style JSON error with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or ERROR_TYPES.get(status, "invalid_request_error")


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> dict[str, Any]:
    info = ErrorInfo(message=message, type=type_ or ERROR_TYPES.get(status, "invalid_request_error"),
                     param=param, code=status)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, type_: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type_), status_code=status)


def sse_error(status: int, message: str) -> str:
    """An error inside an SSE stream (the status line has already gone out)."""
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable sentence from pydantic's error list; names the offending field."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"malformed JSON body: {ctx.get('error', err.get('msg'))}")
            continue
        if not loc and err.get("type") in ("missing", "model_type", "model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object")
            continue
        field = ".".join(loc)
        param = param or field or None
        parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    if len(errors) > 3:
        parts.append(f"(+{len(errors) - 3} more)")
    return "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error while serving a request")
        return error_response(500, f"internal server error: {type(exc).__name__}")
