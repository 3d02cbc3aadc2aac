"""Many members at once, for the large-room tests: lean raw-websocket clients.

A python-socketio client costs a few tasks and a few hundred kilobytes; hundreds of them on
a shared 2-core machine would make the test measure the clients. ``bench/wsclient.py``'s
``SioClient`` is one asyncio Protocol per connection. Here each also keeps what a test
reads: its welcome and the ``presence`` events it got, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from bench import wsclient
from tests.support import NodeProcess

EVENT_TIMEOUT = 10.0


class LeanMember:
    """One lean member of one room: its welcome, every ``presence`` event since, and the
    ``moved`` event if its room moved."""

    def __init__(self) -> None:
        self.client: wsclient.SioClient | None = None
        self.welcomed: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future())
        self.presence: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.moved: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def on_event(self, client: wsclient.SioClient, packet: bytes) -> None:
        event, *args = json.loads(packet[len(client.event_prefix):])
        data = args[0] if args else None
        if event == "welcome" and not self.welcomed.done():
            self.welcomed.set_result(data)
        elif event == "presence":
            self.presence.put_nowait(data)
        elif event == "moved" and not self.moved.done():
            self.moved.set_result(data)

    @property
    def welcome(self) -> dict[str, Any]:
        return self.welcomed.result()

    @property
    def sid(self) -> str:
        return self.welcome["you"]["sid"]

    @property
    def public(self) -> dict[str, str]:
        you = self.welcome["you"]
        return {"sid": you["sid"], "name": you["name"], "member": you["member"]}

    async def call(self, event: str, data: Any, timeout: float = EVENT_TIMEOUT) -> Any:
        """Emit ``event`` with an ack; the ack's first argument."""
        assert self.client is not None
        ack = await asyncio.wait_for(self.client.emit(event, data, ack=True), timeout)
        return ack[0] if ack else None

    async def next_presence(self, timeout: float = EVENT_TIMEOUT) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.presence.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no presence event within {timeout}s") from None

    async def close(self) -> None:
        """Drop the connection and wait (bounded) until it is closed."""
        if self.client is None:
            return
        self.client.close()
        await asyncio.wait_for(asyncio.shield(self.client.closed), EVENT_TIMEOUT)


async def join(node: NodeProcess, room: dict[str, Any], name: str) -> LeanMember:
    """A lean member in ``room``, once its welcome has arrived."""
    member = LeanMember()
    member.client = await wsclient.connect(
        "127.0.0.1", node.port, room["socketio_path"], room["namespace"], {"name": name},
        timeout=EVENT_TIMEOUT, on_event=member.on_event)
    try:
        await asyncio.wait_for(asyncio.shield(member.welcomed), EVENT_TIMEOUT)
    except BaseException:
        member.client.close()
        raise
    return member


async def join_in_order(node: NodeProcess, room: dict[str, Any], count: int,
                        prefix: str = "member") -> list[LeanMember]:
    """``count`` lean members, one after the other (each welcomed before the next comes),
    so their join order is the list's order."""
    members: list[LeanMember] = []
    try:
        for n in range(count):
            members.append(await join(node, room, f"{prefix}-{n}"))
    except BaseException:
        await leave_all(members)
        raise
    return members


async def join_at_once(node: NodeProcess, room: dict[str, Any], count: int,
                       prefix: str = "burst") -> list[LeanMember]:
    """``count`` lean members joining concurrently (a burst)."""
    results = await asyncio.gather(*(join(node, room, f"{prefix}-{n}") for n in range(count)),
                                   return_exceptions=True)
    members = [r for r in results if isinstance(r, LeanMember)]
    failed = [r for r in results if not isinstance(r, LeanMember)]
    if failed:
        await leave_all(members)
        raise AssertionError(f"{len(failed)} of {count} joins failed: {failed[0]!r}")
    return members


async def leave_all(members: list[LeanMember]) -> None:
    for member in members:
        with contextlib.suppress(TimeoutError, OSError):
            await member.close()
