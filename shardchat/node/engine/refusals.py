"""What the engine answers by itself, before or instead of a handler of the node.

Both engines give the same answers: an event name a client may not send, a packet whose
JSON cannot be read, a welcome that could not be built, a handler that failed.
"""

from __future__ import annotations

from typing import Any

from shardchat.refusal import Refusal

# Event names a client may not send. ``connect``/``disconnect``: python-socketio would run
# the node's own lifecycle handler for them, so one client could make its room announce a
# leave (and drop it from the member list) while it stays connected. ``*``: it would match
# the catch-all handler by name, which then gets its arguments shifted. Both engines answer
# them with a ``bad_request`` ack (``refused_event_ack``) and run no handler.
REFUSED_EVENTS = frozenset({"connect", "disconnect", "*"})


def refused_event_ack(event: str) -> dict[str, Any]:
    """The ack of an event in ``REFUSED_EVENTS``."""
    return {"ok": False, "error": "bad_request",
            "message": f"{event!r} is not an event a client may send: "
                       "use message, typing, history or members."}


# The ack of an event whose handler failed (the node's handlers answer their own errors;
# this is what they and the engine's last resort answer).
UNAVAILABLE = {"ok": False, "error": "unavailable",
               "message": "The server failed to handle this request; try again in a moment."}
JOIN_FAILED = Refusal("unavailable", "The server could not let you into this room right now; "
                      "try again in a moment.")
UNREADABLE_EVENT = Refusal("bad_request", "The event could not be read: its JSON is malformed "
                           "or nested too deeply. Send a flat object such as {\"text\": \"hi\"}.")
UNREADABLE_CONNECT = Refusal("bad_request", "The connect request could not be read: its auth "
                             "JSON is malformed or nested too deeply. Send {\"name\": \"...\"}.")
