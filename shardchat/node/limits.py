"""Input rules, and the refusal every check returns (rate limits: ``ratelimit.py``).

Each check returns None when the input is acceptable, or an ``Refusal`` carrying the SPEC
error code and a sentence a person can act on. Nothing here raises on hostile input: a
payload of the wrong type is just another refusal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from shardchat.config import NodeSettings

MAX_ROOM_NAME_CHARS = 100
MAX_CLIENT_ID_CHARS = 64
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50

# What SPEC section 4 refuses in text: control characters (Unicode category Cc: C0, DEL and
# C1) and lone surrogates, which JSON's \uD800 escapes can smuggle in but no UTF-8 encoder,
# browser or database takes. Format characters (the zero-width joiner of emoji sequences)
# are fine. One regex pass: ~1 us for a chat line, ~30 us for 4000 characters.
_BAD_IN_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # \t, \n allowed
_BAD_IN_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str

    def ack(self) -> dict[str, Any]:
        return {"ok": False, "error": self.code, "message": self.message}

    def connect_error(self) -> dict[str, Any]:
        return {"message": self.message, "data": {"code": self.code}}


def check_text(value: str, what: str, *, multiline: bool = False) -> Refusal | None:
    """``bad_request`` when ``value`` is not valid Unicode or holds a control character.

    ``what`` names the field in the sentence ("The message"). ``multiline`` text (messages)
    may hold newlines and tabs; names and ids are one line and may not."""
    found = (_BAD_IN_TEXT if multiline else _BAD_IN_LINE).search(value)
    if found is None:
        return None
    code_point = ord(found.group())
    if 0xD800 <= code_point <= 0xDFFF:
        return Refusal("bad_request", f"{what} is not valid Unicode text: it holds a lone "
                       f"surrogate (U+{code_point:04X}); send whole characters.")
    allowed = " (newlines and tabs are fine)" if multiline else ""
    return Refusal("bad_request", f"{what} holds the control character U+{code_point:04X}; "
                   f"remove it{allowed}.")


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
    return check_text(stripped, "Your display name")


def check_room_name(name: Any) -> Refusal | None:
    if not isinstance(name, str) or not name.strip():
        return Refusal("bad_request", "Give the room a name (1 to "
                       f"{MAX_ROOM_NAME_CHARS} characters).")
    if len(name.strip()) > MAX_ROOM_NAME_CHARS:
        return Refusal("bad_request", f"The room name has {len(name.strip())} characters; "
                       f"use at most {MAX_ROOM_NAME_CHARS}.")
    return check_text(name.strip(), "The room name")


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
    bad = check_text(text, "The message", multiline=True)
    if bad:
        return bad
    client_id = data.get("client_id")
    if client_id is None:
        return None
    if not isinstance(client_id, str) or not 0 < len(client_id) <= MAX_CLIENT_ID_CHARS:
        return Refusal("bad_request", f'"client_id" must be a string of 1 to '
                       f"{MAX_CLIENT_ID_CHARS} characters.")
    return check_text(client_id, '"client_id"')


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
