"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``.

The official client reads the message from that body into the exception it raises, so a
caller sees why (the line, the field) and not just a status. The route class applies the
shape to this router only; the native API keeps FastAPI's ``{"detail": ...}``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException  # FastAPI raises it for unreadable bodies

from api.openai_schemas import describe
from submission.limits import TooBusy
from submission.prepare import BadRequest


class ApiError(Exception):
    """An error answered with its status, a code and the parameter at fault."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    if status == 401:
        code = code or "invalid_api_key"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


class OpenAIRoute(APIRoute):
    """A route whose errors (ours, validation, auth) come back in the OpenAI shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return error_response(exc.status, exc.message, code=exc.code, param=exc.param)
            except BadRequest as exc:
                return error_response(400, str(exc), code="invalid_request")
            except TooBusy as exc:
                return error_response(
                    429,
                    str(exc),
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(exc.retry_after)},
                )
            except RequestValidationError as exc:
                return error_response(
                    400, describe(exc.errors(), prefix=""), code="invalid_request"
                )
            except HTTPException as exc:
                return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

        return route
