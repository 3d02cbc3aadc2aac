"""What the engine answers by itself (shardchat/node/engine/refusals.py) has the shapes
SPEC section 4 gives every failed request and refused connect."""

from __future__ import annotations

from shardchat.node.engine import refusals


def test_refused_events_cover_the_lifecycle_names_and_the_wildcard():
    assert {"connect", "disconnect", "*"} <= refusals.REFUSED_EVENTS
    ack = refusals.refused_event_ack("disconnect")
    assert ack["ok"] is False and ack["error"] == "bad_request" and "'disconnect'" in ack["message"]


def test_every_answer_is_an_ack_or_a_connect_error_with_a_code_and_a_sentence():
    assert refusals.UNAVAILABLE["ok"] is False and refusals.UNAVAILABLE["error"] == "unavailable"
    for refusal in (refusals.JOIN_FAILED, refusals.UNREADABLE_EVENT, refusals.UNREADABLE_CONNECT):
        assert refusal.ack()["error"] == refusal.code and refusal.message.endswith(".")
        assert refusal.connect_error() == {"message": refusal.message,
                                           "data": {"code": refusal.code}}
