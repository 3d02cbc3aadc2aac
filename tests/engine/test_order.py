"""Order across the engine's paths: frames one client gets by direct write and through
python-socketio's own queue arrive in the order they were emitted.

The fast engine writes an event straight to a websocket whose queue is empty and whose
writer is idle, and queues it otherwise; python-socketio's own ``sio.emit`` always queues.
Here one websocket member and one long-polling member of a namespace get a stream of
events in rounds of eight: one through python-socketio's ``sio.emit``, one put on
engineio's queue (``eio.send``) just before the engine's ``Delivery`` emits the next ones,
which must then queue behind it, and six through the ``Delivery``, of which those after the
loop turned go straight to the websocket again. Each member must receive every event
once, in emit order. The same test runs on the stock engine, whose every delivery is
python-socketio's.

The engine runs in this process on a loopback port, as the node runs it: built from the
node's settings, attached to an aiohttp app, with a connect handler and ``on_connected``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import socketio
from aiohttp import web
from socketio import packet as sio_packet

from shardchat.config import NodeSettings
from shardchat.node import engine as engine_mod
from tests.conftest import ENGINES, EVENT_TIMEOUT, RoomClient
from tests.support import bound_port

NAMESPACE = "/i1/room/order"
PATH = "/socket.io"
EVENTS = 320
ROUND = 8  # per round: one sio.emit, one engineio send, six Delivery emits, one loop turn


@dataclass
class Served:
    engine: engine_mod.Engine
    port: int
    joined: asyncio.Queue  # (namespace, sid) once each member's CONNECT is out


@pytest.fixture(params=ENGINES)
async def served(request) -> AsyncIterator[Served]:
    built = engine_mod.build(NodeSettings(engine=request.param))
    sio = built.sio
    joined: asyncio.Queue = asyncio.Queue()

    @sio.on("connect", namespace="*")
    async def connect(namespace, sid, environ, auth=None):
        return None

    async def connected(namespace: str, sid: str) -> None:
        joined.put_nowait((namespace, sid))

    sio.on_connected = connected
    app = web.Application()
    sio.attach(app, socketio_path=PATH)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Served(built, bound_port(runner), joined)
    finally:
        await built.close_sessions(1.0)
        await runner.cleanup()
        await sio.shutdown()


async def member(served: Served, transport: str) -> tuple[RoomClient, str, str]:
    """A joined python-socketio client: (client, its Socket.IO sid, its Engine.IO sid)."""
    client = RoomClient(socketio.AsyncClient(reconnection=False), NAMESPACE)
    await client.sio.connect(f"http://127.0.0.1:{served.port}", namespaces=[NAMESPACE],
                             socketio_path=PATH, transports=[transport], wait_timeout=5)
    namespace, sid = await asyncio.wait_for(served.joined.get(), EVENT_TIMEOUT)
    assert namespace == NAMESPACE
    eio_sid = served.engine.delivery.transport_id(namespace, sid)
    assert eio_sid is not None
    return client, sid, eio_sid


async def test_direct_and_queued_frames_of_one_client_arrive_in_emit_order(served):
    websocket, ws_sid, ws_eio = await member(served, "websocket")
    polling, poll_sid, poll_eio = await member(served, "polling")
    sio, delivery = served.engine.sio, served.engine.delivery
    recipients = [(ws_sid, ws_eio), (poll_sid, poll_eio)]
    before = delivery.stats()
    through_delivery = 0
    try:
        for seq in range(EVENTS):
            step = seq % ROUND
            if step == 0:  # python-socketio's broadcast, awaited to the end
                await sio.emit("message", {"seq": seq}, to=[ws_sid, poll_sid],
                               namespace=NAMESPACE)
            elif step == ROUND // 2:  # onto engineio's queue; its writer has not run yet
                encoded = sio.packet_class(sio_packet.EVENT, namespace=NAMESPACE,
                                           data=["message", {"seq": seq}]).encode()
                for eio_sid in (ws_eio, poll_eio):
                    await sio.eio.send(eio_sid, encoded)
            else:
                await delivery.emit(NAMESPACE, "message", {"seq": seq}, recipients)
                through_delivery += 1
            if step == ROUND - 1:
                await asyncio.sleep(0)  # one loop turn: the writer drains what was queued
        for client in (websocket, polling):
            got = [(await client.next("message", timeout=EVENT_TIMEOUT * 2))["seq"]
                   for _ in range(EVENTS)]
            assert got == list(range(EVENTS))
            assert client.pending("message") == []
    finally:
        for client in (websocket, polling):
            with contextlib.suppress(Exception):
                await client.close()
    if served.engine.kind == "fast":
        after = delivery.stats()
        direct = after["fast"] - before["fast"]  # only the websocket member can be direct
        queued = after["slow"] - before["slow"] - through_delivery  # minus the poller's
        assert direct > 0 and queued > 0, (direct, queued)
