"""Invite tokens (shardchat/node/invites.py) as plain functions: bound to one room, signed
with the cluster secret, and expiring after the configured lifetime. Time is passed in
(``now=``), so expiry is tested at its exact edge without waiting."""

from __future__ import annotations

from shardchat.node.invites import Invites

TTL = 3600.0
T0 = 1_700_000_000.0


def test_an_invite_opens_its_room_until_it_expires():
    invites = Invites("secret-one", TTL)
    token = invites.issue("room-a", now=T0)
    assert invites.check("room-a", token, now=T0) is None
    assert invites.check("room-a", token, now=T0 + TTL) is None  # the last second
    expired = invites.check("room-a", token, now=T0 + TTL + 1)
    assert expired is not None and "expired" in expired


def test_an_invite_never_opens_another_room_or_another_cluster():
    token = Invites("secret-one", TTL).issue("room-a", now=T0)
    assert "not valid" in Invites("secret-one", TTL).check("room-b", token, now=T0)
    assert "not valid" in Invites("secret-two", TTL).check("room-a", token, now=T0)


def test_a_forged_expiry_breaks_the_signature():
    invites = Invites("secret-one", TTL)
    expiry, _, sig = invites.issue("room-a", now=T0).partition(".")
    later = invites.issue("room-a", now=T0 + 10 * TTL).partition(".")[0]
    assert later != expiry
    assert "not valid" in invites.check("room-a", f"{later}.{sig}", now=T0 + 2 * TTL)


def test_a_missing_invite_says_the_room_is_private():
    invites = Invites("secret-one", TTL)
    for token in (None, "", 42):
        assert "private" in invites.check("room-a", token, now=T0)
