"""Input rules, and the refusal every check returns (rate limits: ``ratelimit.py``).

Each check returns None when the input is acceptable, or an ``Refusal`` carrying the SPEC
error code and a sentence a person can act on. Nothing here raises on hostile input: a
payload of the wrong type is just another refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardchat.config import NodeSettings

MAX_ROOM_NAME_CHARS = 100
MAX_CLIENT_ID_CHARS = 64
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str

    def ack(self) -> dict[str, Any]:
        return {"ok": False, "error": self.code, "message": self.message}

    def connect_error(self) -> dict[str, Any]:
        return {"message": self.message, "data": {"code": self.code}}


def check_display_name(name: Any, settings: NodeSettings) -> Refusal | None:
    if not isinstance(name, str):
        return Refusal("bad_request", "Choose a display name (text, "
                       f"1 to {settings.max_name_chars} characters).")
    stripped = name.strip()
    if not stripped:
        return Refusal("bad_request", "Your display name is blank: choose one with at least "
                       "one visible character.")
    if len(stripped) > settings.max_name_chars:
        return Refusal("bad_request", f"Your display name has {len(stripped)} characters; "
                       f"use at most {settings.max_name_chars}.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in stripped):
        return Refusal("bad_request", "Your display name contains control characters.")
    return None


def check_room_name(name: Any) -> Refusal | None:
    if not isinstance(name, str) or not name.strip():
        return Refusal("bad_request", "Give the room a name (1 to "
                       f"{MAX_ROOM_NAME_CHARS} characters).")
    if len(name.strip()) > MAX_ROOM_NAME_CHARS:
        return Refusal("bad_request", f"The room name has {len(name.strip())} characters; "
                       f"use at most {MAX_ROOM_NAME_CHARS}.")
    return None


def check_message(data: Any, settings: NodeSettings) -> Refusal | None:
    if not isinstance(data, dict):
        return Refusal("bad_request", 'Send a message as an object: {"text": "..."}.')
    text = data.get("text")
    if not isinstance(text, str):
        return Refusal("bad_request", 'The message needs a "text" string.')
    if not text.strip():
        return Refusal("empty", "The message is empty: type something before sending.")
    if len(text) > settings.max_message_chars:
        return Refusal("too_long", f"The message has {len(text)} characters; the limit is "
                       f"{settings.max_message_chars}. Split it into several messages.")
    client_id = data.get("client_id")
    if client_id is not None and (not isinstance(client_id, str)
                                  or not 0 < len(client_id) <= MAX_CLIENT_ID_CHARS):
        return Refusal("bad_request", f'"client_id" must be a string of 1 to '
                       f"{MAX_CLIENT_ID_CHARS} characters.")
    return None


def check_history(data: Any) -> Refusal | None:
    if not isinstance(data, dict):
        return Refusal("bad_request", 'Ask for history as {"before": <seq>, "limit": 1..100}.')
    before, limit = data.get("before"), data.get("limit", DEFAULT_HISTORY_LIMIT)
    if before is not None and (not _is_int(before) or before < 1):
        return Refusal("bad_request", '"before" must be a positive whole number (a seq).')
    if not _is_int(limit) or not 1 <= limit <= MAX_HISTORY_LIMIT:
        return Refusal("bad_request", f'"limit" must be a whole number from 1 to '
                       f"{MAX_HISTORY_LIMIT}.")
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


is_int = _is_int
