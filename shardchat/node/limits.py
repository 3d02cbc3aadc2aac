"""Input rules of the events a member sends (rate limits: ``ratelimit.py``).

Each check returns None when the input is acceptable, or a ``Refusal`` carrying the SPEC
error code and a sentence a person can act on (``shardchat/refusal.py``, with the text rule
every check shares). Nothing here raises on hostile input: a payload of the wrong type is
just another refusal. The room name belongs to the room request, which the public API and
the internal create call read alike: it is checked in ``shardchat/internal_api.py``.
"""

from __future__ import annotations

from typing import Any

from shardchat.config import MAX_MEMBERS_PAGE, NodeSettings
from shardchat.refusal import Refusal, check_text

MAX_CLIENT_ID_CHARS = 64
MAX_HISTORY_LIMIT = 100
DEFAULT_HISTORY_LIMIT = 50
DEFAULT_MEMBERS_LIMIT = 100
MAX_SID_CHARS = 64  # far longer than any sid the server hands out (20 characters)


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


def check_members(data: Any) -> Refusal | None:
    """A ``members`` page request: ``{"after": <sid or null>, "limit": 1..500}``, both
    optional. Whether ``after`` names a member is the roster's to say (``roster.py``)."""
    if not isinstance(data, dict):
        return Refusal("bad_request", 'Ask for members as {"after": null, "limit": 1..'
                       f'{MAX_MEMBERS_PAGE}}}, then pass each answer\'s "next" as "after".')
    after, limit = data.get("after"), data.get("limit", DEFAULT_MEMBERS_LIMIT)
    if after is not None and (not isinstance(after, str)
                              or not 0 < len(after) <= MAX_SID_CHARS):
        return Refusal("bad_request", '"after" must be null (the first page) or the "next" '
                       "sid of the page before.")
    if not _is_int(limit) or not 1 <= limit <= MAX_MEMBERS_PAGE:
        return Refusal("bad_request", f'"limit" must be a whole number from 1 to '
                       f"{MAX_MEMBERS_PAGE}.")
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


is_int = _is_int
