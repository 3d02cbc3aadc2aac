"""Helpers of the move tests: asking nodes to move rooms and what they are to a room, and a
member that keeps sending while a room moves, recording every ack.

What a move test asserts at the end is always the same (``assert_one_owner_holds``): one node
owns the room, the other forwards it or knows nothing of it, and the owner holds every acked
message once, seqs without a gap, a resend of an acked ``client_id`` a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
from typing import Any

from tests.conftest import RoomClient, open_client
from tests.support import AUTH, NodeProcess, http_json

MOVE_TIMEOUT = 60.0


def move_room(node: NodeProcess, room_id: str, to: int) -> tuple[int | None, Any]:
    """``POST /internal/rooms/<id>/move``; (None, error) when the node died answering."""
    try:
        return http_json("POST", f"{node.internal_url}/internal/rooms/{room_id}/move",
                         {"to": to}, headers=AUTH, timeout=MOVE_TIMEOUT)
    except (OSError, http.client.HTTPException) as exc:
        return None, repr(exc)


def room_state(node: NodeProcess, room_id: str) -> tuple[int, Any]:
    """``GET /internal/rooms/<id>``: (200, {"state": ...}) or (404, error)."""
    return http_json("GET", f"{node.internal_url}/internal/rooms/{room_id}", headers=AUTH)


def stats(node: NodeProcess) -> dict[str, Any]:
    status, body = http_json("GET", f"{node.internal_url}/internal/stats", headers=AUTH)
    assert status == 200, body
    return body


def settled(nodes: list[NodeProcess], room_id: str) -> NodeProcess | None:
    """The owner once exactly one node owns the room and no node holds a copy arriving."""
    owners, arriving = [], []
    for node in nodes:
        status, body = room_state(node, room_id)
        state = body.get("state") if status == 200 else None
        if state == "owner":
            owners.append(node)
        elif state == "incoming":
            arriving.append(node)
    return owners[0] if len(owners) == 1 and not arriving else None


class Sender:
    """A member that sends messages with client ids one after the other, until stopped or
    until the node stops answering, and records what each ack said."""

    def __init__(self, client: RoomClient, prefix: str = "live", timeout: float = 3.0,
                 limit: int | None = None):
        self.client = client
        self.prefix = prefix
        self.timeout = timeout
        self.limit = limit  # messages to send at most (None: until stopped)
        self.acked: dict[str, int] = {}  # client_id -> seq of an ok ack
        self.moved: list[dict[str, Any]] = []  # acks with error "moved"
        self.other: list[Any] = []  # anything else (unavailable, a timeout, a disconnect)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._count = 0

    def start(self) -> Sender:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set() and (self.limit is None or self._count < self.limit):
            cid = f"{self.prefix}-{self._count}"
            self._count += 1
            try:
                ack = await self.client.call("message", {"text": cid, "client_id": cid},
                                             timeout=self.timeout)
            except Exception as exc:  # the node died or closed the namespace
                self.other.append(repr(exc))
                return
            if isinstance(ack, dict) and ack.get("ok"):
                self.acked[cid] = ack["seq"]
            elif isinstance(ack, dict) and ack.get("error") == "moved":
                self.moved.append(ack)
                return
            else:
                self.other.append(ack)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, self.timeout + 5)


async def assert_one_owner_holds(owner: NodeProcess, other: NodeProcess,
                                 room: dict[str, Any], acked: dict[str, int],
                                 token: str) -> None:
    """The end state of every move, crashed or not (SPEC section 8)."""
    rid = room["id"]
    status, body = room_state(other, rid)
    assert status == 404 or (status == 200 and body["state"] == "forwarded"
                             and body["to"] == owner.number), (status, body)
    member = await open_client(owner, rid, name="sender", invite=room.get("invite"),
                               last_seq=0, token=token)
    try:
        welcome = member.welcome
        assert welcome["recovered"] is True and not welcome.get("more"), welcome
        history = welcome["history"]
        seqs = [m["seq"] for m in history]
        assert seqs == list(range(1, len(seqs) + 1)), f"seqs with a gap: {seqs}"
        by_client: dict[str, list[int]] = {}
        for m in history:
            by_client.setdefault(m["client_id"], []).append(m["seq"])
        for cid, seq in acked.items():
            assert by_client.get(cid) == [seq], f"acked {cid} (seq {seq}) is held as " \
                                                f"{by_client.get(cid)}"
        if acked:
            cid, seq = max(acked.items(), key=lambda kv: kv[1])
            again = await member.send(cid, client_id=cid)
            assert again.get("ok") is True and again["seq"] == seq, again  # a duplicate
            fresh = await member.send_ok("after the move", client_id="after-the-move")
            assert fresh["seq"] == len(seqs) + 1, fresh
    finally:
        await member.close()
