"""The shapes a move shares with the rest of the node: where a room went, the gate its
messages wait at while it is frozen, and what a move reports.

The room service only ever sees a ``MoveView`` (``moved_to``, ``incoming``, ``gate``): it
never learns how a move runs, and a node without moves (``NO_MOVES``) is the same service.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from shardchat import urls
from shardchat.refusal import Refusal

MOVED_MESSAGE = ("This room has moved to instance {n}; reconnect at its new address "
                 "(namespace {ns}, path {path}).")


@dataclass(frozen=True)
class MovedTo:
    """Where room ``room`` lives now: instance ``instance``, under ``public_url``."""

    room: str
    instance: int
    public_url: str

    def fields(self) -> dict[str, Any]:
        """SPEC section 8: the fields of the ``moved`` event, refusal and ack."""
        path = urls.room_path(self.instance, self.room)
        return {"instance": self.instance, "path": path,
                "url": urls.join_url(self.public_url, path),
                "namespace": urls.room_namespace(self.instance, self.room),
                "socketio_path": urls.socketio_path(self.instance)}

    @property
    def sentence(self) -> str:
        return MOVED_MESSAGE.format(n=self.instance,
                                    ns=urls.room_namespace(self.instance, self.room),
                                    path=urls.socketio_path(self.instance))

    def event(self) -> dict[str, Any]:
        """The ``moved`` event every member gets before it is disconnected."""
        return {"room": self.room, **self.fields()}

    def ack(self) -> dict[str, Any]:
        """The ack of a message (or history request) the old owner did not take."""
        return {"ok": False, "error": "moved", "message": self.sentence, **self.fields()}

    def refusal(self) -> MovedRefusal:
        """The CONNECT_ERROR of a connect to the old namespace."""
        return MovedRefusal("moved", self.sentence, self.fields())


@dataclass(frozen=True)
class MovedRefusal(Refusal):
    """A ``moved`` refusal: the code and sentence of any refusal, plus where the room is."""

    fields: dict[str, Any] | None = None

    def ack(self) -> dict[str, Any]:
        return {**super().ack(), **(self.fields or {})}

    def connect_error(self) -> dict[str, Any]:
        out = super().connect_error()
        out["data"].update(self.fields or {})
        return out


INCOMING_REFUSAL = Refusal("unavailable", "This room is moving here; reconnect in a moment.")
FROZEN_TIMEOUT = Refusal("unavailable", "This room is moving; send the message again in a "
                         "moment.")


class Gate:
    """Where messages of a frozen room wait for the move's outcome.

    ``open(None)``: the move was called off and the room serves here again; ``open(moved)``:
    the room is elsewhere now, and every waiter answers its sender with ``moved``."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()
        self.outcome: MovedTo | None = None

    def open(self, outcome: MovedTo | None) -> None:
        self.outcome = outcome
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    async def wait(self, timeout: float) -> MovedTo | None:
        """The outcome; TimeoutError when the move has not ended within ``timeout``."""
        await asyncio.wait_for(self._opened.wait(), timeout)
        return self.outcome


class MoveView(Protocol):
    """What the room service asks about moves, per room id."""

    def moved_to(self, room_id: str) -> MovedTo | None:
        """Where a room that left this node lives now (None: it did not leave)."""

    def incoming(self, room_id: str) -> bool:
        """True while a copy of the room is arriving here (it is not served yet)."""

    def gate(self, room_id: str) -> Gate | None:
        """The gate of a frozen room, None when its messages may be stored."""


class NoMoves:
    """The ``MoveView`` of a node that moves nothing."""

    def moved_to(self, room_id: str) -> MovedTo | None:
        return None

    def incoming(self, room_id: str) -> bool:
        return False

    def gate(self, room_id: str) -> Gate | None:
        return None


NO_MOVES = NoMoves()


@dataclass(frozen=True)
class MoveReport:
    """What one move did: the answer of ``POST /internal/rooms/<id>/move``."""

    room: str
    source: int
    target: int
    messages: int  # messages copied (live rounds and the frozen delta)
    last_seq: int
    took_ms: float
    frozen_ms: float  # how long new messages of the room waited
    activated: bool  # False: the target did not confirm yet; it is retried until it does

    def to_json(self) -> dict[str, Any]:
        return {"room": self.room, "from": self.source, "to": self.target,
                "messages": self.messages, "last_seq": self.last_seq,
                "took_ms": round(self.took_ms, 1), "frozen_ms": round(self.frozen_ms, 1),
                "activated": self.activated}


class MoveError(Exception):
    """A move that did not happen (or could not start): the HTTP status and code of the
    answer, a sentence, and extra fields (where the room is, for ``not_owner``)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
