"""Signed, room-bound invite tokens for private rooms.

A token is ``<expiry>.<signature>``: the expiry in epoch seconds (base 36) and an
HMAC-SHA256 over the room id and that expiry, keyed by a key derived from the cluster
secret. Nothing is stored: any node holding the secret can check a token, a token for room A
never opens room B, and changing the secret revokes every invite at once.

A token comes from the client, so ``check`` reads it as hostile: it is length-bounded, the
expiry must be plain base-36 digits of a plausible length (``int`` would otherwise accept
signs, underscores, spaces and thousands of digits), and the signature is compared in
constant time as bytes. Anything else is simply an invite that does not open the room.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time

_KEY_LABEL = b"shardchat invite v1"
_SIG_BYTES = 16  # 128 bits: forging one is out of reach, and the link stays short
_SIG_CHARS = 22  # base64url of 16 bytes, unpadded
_EXPIRY = re.compile(r"[0-9a-z]{1,12}")  # base-36 epoch seconds; 12 digits last 150,000 years
_MAX_TOKEN_CHARS = 12 + 1 + _SIG_CHARS
_INVALID = "The invite is not valid for this room: ask a member for the link again."


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
        if len(token) > _MAX_TOKEN_CHARS or not token.isascii():
            return _INVALID
        exp_text, _, sig = token.partition(".")
        if _EXPIRY.fullmatch(exp_text) is None:
            return _INVALID
        expiry = int(exp_text, 36)
        if not hmac.compare_digest(sig.encode("ascii"),
                                   self._sign(room_id, expiry).encode("ascii")):
            return _INVALID
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
