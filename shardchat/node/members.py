"""Member identity: who sent a message, as the server sees it, not as the sender claims.

A display name is not an identity: anyone can pick anyone's name. The server therefore
gives every connection a *member id* of its own and a signed *member token* that proves it.
The page keeps the token and passes it back in ``auth.token`` when it reconnects, so a
reconnect (or a node restart, or a move to another node of the cluster) keeps the member id,
and with it message dedup and "is this my own message".

* The member id is 128 random bits, base64url (22 characters). It is public: messages,
  members and presence carry it as ``member`` so clients can tell two people of the same
  name apart.
* The token is ``<member id>.<signature>``: an HMAC-SHA256 over the room id and the member
  id, keyed by a key derived from the cluster secret under its own label (an invite can
  never pass as a member token, nor the other way round). Nothing is stored: any node
  holding the secret checks a token, a token of room A is worthless in room B, and the
  signature cannot be made from the public member id.
* A token does not expire. It names a member of one room, not a permission; changing the
  cluster secret gives everybody a fresh identity at their next connect.

``MemberTokens.identify`` is the one place that decides a connection's identity; everything
keyed on "who is this member" (dedup, rate limits) uses its answer, ``Member.identity``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

_KEY_LABEL = b"shardchat member v1"
_ID_BYTES = 16  # 128 random bits: nobody guesses another member's id
_SIG_BYTES = 16  # 128 bits of signature: forging one is out of reach
_ID_CHARS = 22  # base64url of 16 bytes, unpadded
MAX_TOKEN_CHARS = 200  # anything longer is not one of ours and is not even hashed


@dataclass(frozen=True)
class Identity:
    """A connection's member identity: the public id, and the token that proves it."""

    member: str
    token: str


class MemberTokens:
    def __init__(self, secret: str):
        self._key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()

    def _sign(self, room_id: str, member: str) -> str:
        # one-shot hmac.digest: no HMAC object built per join
        mac = hmac.digest(self._key, f"{room_id}\n{member}".encode(), "sha256")
        return _b64(mac[:_SIG_BYTES])

    def token(self, room_id: str, member: str) -> str:
        """The token of ``member`` in ``room_id`` (always the same string for the pair)."""
        return f"{member}.{self._sign(room_id, member)}"

    def check(self, room_id: str, token: object) -> str | None:
        """The member id ``token`` proves in ``room_id``, or None when it proves nothing."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            return None  # ours are ASCII; a lone surrogate could not even be encoded
        member, dot, sig = token.partition(".")
        if not dot or len(member) != _ID_CHARS:
            return None
        if not hmac.compare_digest(sig.encode(), self._sign(room_id, member).encode()):
            return None
        return member

    def identify(self, room_id: str, token: object) -> Identity:
        """The identity of a connection to ``room_id`` that presented ``token``.

        A valid token of this room keeps its member id; anything else (no token, a forged
        one, one of another room or of an old cluster secret) gets a fresh member id. A bad
        token is not refused: it is what a client holds after the secret changed, and a
        fresh identity is the honest answer to it.
        """
        member = self.check(room_id, token)
        if member is None:
            member = _b64(secrets.token_bytes(_ID_BYTES))
        return Identity(member, self.token(room_id, member))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
