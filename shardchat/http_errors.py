"""The one shape of an HTTP error answer: JSON ``{"error": <code>, "message": <sentence>}``.

SPEC gives every refusal a code and a sentence a person can act on; nodes (public and
internal listeners) and the local router all answer through this function, so the shape is
written once. It imports nothing of shardchat, so any layer may use it."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def json_error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    """A JSON error answer; ``extra`` adds fields (e.g. ``instance`` for a 421)."""
    return web.json_response({"error": code, "message": message, **extra}, status=status)
