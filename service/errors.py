"""Validation errors a client can read: every problem with its field path, each echoed input
cut to an excerpt, and nothing JSON cannot carry (NaN, bytes, lone surrogates)."""

from __future__ import annotations

import math
import reprlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from bulwark.store.store import StoreError

EXCERPT_CHARS = 200
_REPR = reprlib.Repr()  # bounded: 3 levels, 6 items each, strings of 40
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 40


def excerpt(value: Any) -> Any:
    """An error's echo of the input, short: a string cut at EXCERPT_CHARS, a small list or
    mapping as it is, a large or deep one as the start of its repr (never walked whole)."""
    if isinstance(value, str):
        return value if len(value) <= EXCERPT_CHARS else value[:EXCERPT_CHARS] + "…"
    if isinstance(value, dict | list | tuple):
        if _small(value):
            return value
        return _REPR.repr(value)[:EXCERPT_CHARS]
    return value


def _small(value: Any, nodes: int = 40, depth: int = 4) -> bool:
    """Whether ``value`` holds at most ``nodes`` values, ``depth`` deep (an iterative walk that
    stops as soon as either is passed)."""
    todo = [(value, 0)]
    while todo:
        v, d = todo.pop()
        nodes -= 1
        if nodes < 0 or d > depth:
            return False
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list | tuple):
            todo.extend((x, d + 1) for x in v)
        elif isinstance(v, str) and len(v) > EXCERPT_CHARS:
            return False
    return True


def short_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors (at most 50) with each echoed input cut to an excerpt, JSON-safe."""
    return json_safe([{**e, "input": excerpt(e["input"])} if "input" in e else e
                      for e in errors[:50]])


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as its string ("nan", "inf") and every lone UTF-16
    surrogate (JSON's "\\udc80" escapes decode to them) as "?": JSON-encodable as UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, BaseException):
        return str(value)
    return value


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        return JSONResponse({"detail": short_errors(exc.errors(include_url=False))},
                            status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        # the default handler echoes the whole input, which may be large, or hold NaN /
        # Infinity / bytes that JSON cannot carry (a 500): the same 422, each input an excerpt
        # and such values as strings
        errs = [{**e, "input": excerpt(e["input"])} if "input" in e else e
                for e in list(exc.errors())[:50]]
        return JSONResponse({"detail": json_safe(jsonable_encoder(
            errs, custom_encoder={bytes: lambda b: b.decode(errors="replace")[:EXCERPT_CHARS]}))},
            status_code=422)
