"""Signed, room-bound invite tokens for private rooms.

A token is ``<expiry>.<signature>``: the expiry in epoch seconds (base 36) and an
HMAC-SHA256 over the room id and that expiry, keyed by a key derived from the cluster
secret. Nothing is stored: any node holding the secret can check a token, a token for room A
never opens room B, and changing the secret revokes every invite at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

_KEY_LABEL = b"shardchat invite v1"
_SIG_BYTES = 16  # 128 bits: forging one is out of reach, and the link stays short


class Invites:
    def __init__(self, secret: str, ttl_seconds: float):
        self._key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
        self._ttl = ttl_seconds

    def _sign(self, room_id: str, expiry: int) -> str:
        mac = hmac.new(self._key, f"{room_id}\n{expiry}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:_SIG_BYTES]).rstrip(b"=").decode()

    def issue(self, room_id: str, now: float | None = None) -> str:
        """A fresh invite for ``room_id`` that expires after the configured TTL."""
        expiry = int((time.time() if now is None else now) + self._ttl)
        return f"{_b36(expiry)}.{self._sign(room_id, expiry)}"

    def check(self, room_id: str, token: object, now: float | None = None) -> str | None:
        """None when ``token`` opens ``room_id``; otherwise a sentence saying why not."""
        if not isinstance(token, str) or not token:
            return "This room is private: join with the invite link a member shared."
        exp_text, _, sig = token.partition(".")
        try:
            expiry = int(exp_text, 36)
        except ValueError:
            return "The invite is not valid for this room: ask a member for the link again."
        if not hmac.compare_digest(sig, self._sign(room_id, expiry)):
            return "The invite is not valid for this room: ask a member for the link again."
        if expiry < (time.time() if now is None else now):
            return "The invite has expired: ask a member of the room for a new link."
        return None


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out
