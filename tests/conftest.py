"""Shared fixtures for the node tests: running nodes, rooms, and joined Socket.IO clients.

Every client talks to a real ``shardchat node`` process on a loopback port. Waiting is on
events (a queue, an Event) with a deadline, never on a bare sleep, so a slow machine makes a
test slower but never wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import engineio
import pytest
import socketio

from bench.wsclient import SioClient
from shardchat import urls
from tests.support import SECRET, NodeProcess, http_json, running_nodes

TRANSPORTS = [["websocket"], ["polling"]]
ENGINES = ["fast", "stock"]  # node.engine; a module setting ``ENGINES = ENGINES`` runs on both
EVENT_TIMEOUT = 5.0

# Marker for "take the invite from the room JSON" (None means: send no invite at all).
FROM_ROOM = object()


@pytest.fixture(params=TRANSPORTS, ids=["websocket", "polling"])
def transport(request) -> list[str]:
    """Every protocol test runs once per Engine.IO transport a browser may end up on."""
    return request.param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run a test once per engine when its module says ``ENGINES = [...]`` (or the test is
    marked ``@pytest.mark.engines(...)``) and it uses the ``engine`` fixture, directly or
    through ``node1``. Module scope: each engine's ``node1`` is started once."""
    if "engine" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("engines")
    engines = list(marker.args) if marker else getattr(metafunc.module, "ENGINES", None)
    if engines:
        metafunc.parametrize("engine", engines, indirect=True, scope="module")


@pytest.fixture(scope="module")
def engine(request) -> str:
    """The ``node.engine`` of the nodes a test starts: "fast" unless parametrized."""
    return getattr(request, "param", "fast")


@pytest.fixture(scope="module")
def node1(tmp_path_factory, engine) -> Iterator[NodeProcess]:
    """One node shared by a test module (per engine); tests stay independent by using
    fresh rooms.

    The rate limit is raised so that tests which need many messages are not throttled;
    the rate-limit test runs its own node with a tiny limit.
    """
    tmp = tmp_path_factory.mktemp("node1")
    with running_nodes(tmp, 1, engine=engine, node={"rate_limit_messages": 100_000}) as nodes:
        yield nodes[0]


# ---------------------------------------------------------------------------------------
# rooms


def create_room(node: NodeProcess, name: str = "Test room", private: bool = False,
                via: str = "internal") -> dict[str, Any]:
    """Create a room on ``node``: over its internal listener (pinned to this node) or the
    public API (placed by the cluster). Returns the SPEC section 3 room JSON."""
    body = {"name": name, "private": private}
    if via == "internal":
        status, room = http_json("POST", f"{node.internal_url}/internal/rooms", body,
                                 headers={"Authorization": f"Bearer {SECRET}"})
    else:
        status, room = http_json("POST", f"{node.base_url}/api/rooms", body)
    assert status == 201, f"room creation failed: {status} {room}"
    return room


async def acreate_room(node: NodeProcess, name: str = "Test room", private: bool = False,
                       via: str = "internal") -> dict[str, Any]:
    """``create_room`` without blocking the event loop that live clients run on."""
    return await asyncio.to_thread(create_room, node, name, private, via)


# ---------------------------------------------------------------------------------------
# clients


class RoomClient:
    """A python-socketio client joined to one room namespace, every event it got queued."""

    def __init__(self, sio: socketio.AsyncClient, namespace: str):
        self.sio = sio
        self.namespace = namespace
        self.events: defaultdict[str, asyncio.Queue] = defaultdict(asyncio.Queue)
        self.connect_errors: asyncio.Queue = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self.welcome: dict[str, Any] = {}
        sio.on("*", self._on_event, namespace=namespace)
        sio.on("connect_error", self._on_connect_error, namespace=namespace)
        sio.on("disconnect", self._on_disconnect, namespace=namespace)

    async def _on_event(self, event: str, *args: Any) -> None:
        self.events[event].put_nowait(args[0] if len(args) == 1 else list(args))

    async def _on_connect_error(self, data: Any = None) -> None:
        self.connect_errors.put_nowait(data)

    async def _on_disconnect(self, *_: Any) -> None:
        self.disconnected.set()

    @property
    def sid(self) -> str:
        return self.welcome["you"]["sid"]

    @property
    def token(self) -> str:
        """The member token the welcome gave: pass it back to stay the same member."""
        return self.welcome["you"]["token"]

    @property
    def public(self) -> dict[str, str]:
        """How others see this client: in messages' ``from``, members and presence."""
        you = self.welcome["you"]
        return {"sid": you["sid"], "name": you["name"], "member": you["member"]}

    @property
    def connected(self) -> bool:
        return self.sio.connected and self.namespace in self.sio.namespaces

    async def next(self, event: str, timeout: float = EVENT_TIMEOUT) -> Any:
        """The next ``event`` this client received, waiting up to ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.events[event].get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {event!r} event within {timeout}s") from None

    def pending(self, event: str) -> list[Any]:
        """Every ``event`` received so far and not yet taken (does not wait)."""
        out = []
        q = self.events[event]
        while not q.empty():
            out.append(q.get_nowait())
        return out

    async def call(self, event: str, data: Any = None, timeout: float = EVENT_TIMEOUT) -> Any:
        """Emit ``event`` and return the server's ack."""
        return await self.sio.call(event, data, namespace=self.namespace, timeout=timeout)

    async def emit(self, event: str, data: Any = None) -> None:
        await self.sio.emit(event, data, namespace=self.namespace)

    async def send(self, text: str, client_id: str | None = None) -> dict[str, Any]:
        """Send a chat message and return its ack."""
        payload: dict[str, Any] = {"text": text}
        if client_id is not None:
            payload["client_id"] = client_id
        return await self.call("message", payload)

    async def send_ok(self, text: str, client_id: str | None = None) -> dict[str, Any]:
        ack = await self.send(text, client_id)
        assert ack.get("ok") is True, f"message {text[:40]!r} refused: {ack}"
        return ack

    async def close(self) -> None:
        """Leave the room and drop the connection without waiting for the last long-poll.

        A plain ``disconnect()`` over polling waits for the pending GET, which the Engine.IO
        server only answers after ping_interval + ping_timeout (40 s by default). Here the
        leave and the Engine.IO close are flushed first, then the pending GET is abandoned.
        """
        sio, eio = self.sio, self.sio.eio
        if eio.state != "connected" or eio.current_transport == "websocket":
            with contextlib.suppress(Exception):
                await sio.disconnect()
            return
        await close_polling(sio, EVENT_TIMEOUT)


async def close_polling(sio: socketio.AsyncClient, timeout: float,
                        leave: bool = True) -> None:
    """End a long-polling client's Engine.IO session without waiting for its pending GET:
    the Socket.IO DISCONNECT of each namespace first (unless ``leave`` is False: the server
    then disconnects them itself), the Engine.IO CLOSE flushed, then the GET abandoned."""
    eio = sio.eio
    with contextlib.suppress(Exception):
        if leave:
            for ns in list(sio.namespaces):
                await sio._send_packet(sio.packet_class(socketio.packet.DISCONNECT,
                                                        namespace=ns))
        await eio._send_packet(engineio.packet.Packet(engineio.packet.CLOSE))
        await asyncio.wait_for(eio.queue.join(), timeout)
    task = getattr(eio, "read_loop_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(task, timeout)
    with contextlib.suppress(Exception):
        await eio.disconnect(abort=True)


async def all_history(client: RoomClient) -> list[dict[str, Any]]:
    """Every stored message of the client's room, oldest first (pages of 100)."""
    out: list[dict[str, Any]] = []
    before = client.welcome["last_seq"] + 1
    for _ in range(1000):
        page = await client.call("history", {"before": before, "limit": 100})
        assert page["ok"] is True, page
        if not page["messages"]:
            break
        out = page["messages"] + out
        before = page["messages"][0]["seq"]
    return out


class Refused(Exception):
    """A connect the node refused; ``data`` is the CONNECT_ERROR payload."""

    def __init__(self, data: Any):
        super().__init__(f"connect refused: {data!r}")
        self.data = data

    @property
    def code(self) -> Any:
        inner = self.data.get("data") if isinstance(self.data, dict) else None
        return inner.get("code") if isinstance(inner, dict) else None


def room_target(node: NodeProcess, room: dict[str, Any] | str) -> tuple[str, str]:
    """(namespace, socketio_path) of a room JSON or a bare room id on ``node``."""
    if isinstance(room, dict):
        return room["namespace"], room["socketio_path"]
    return urls.room_namespace(node.number, room), urls.socketio_path(node.number)


async def open_client(node: NodeProcess, room: dict[str, Any] | str, *, name: str = "alice",
                      transport: list[str] | None = None, invite: Any = FROM_ROOM,
                      last_seq: int | None = None, auth: Any = FROM_ROOM,
                      namespace: str | None = None, socketio_path: str | None = None,
                      token: str | None = None) -> RoomClient:
    """Connect to a room and wait for its ``welcome``; raises Refused on CONNECT_ERROR.

    ``auth`` replaces the whole auth object (to send malformed ones); otherwise it is built
    from ``name``, ``invite`` (default: the room JSON's invite, if any), ``last_seq`` and
    ``token`` (a member token from an earlier welcome).
    """
    ns, path = room_target(node, room)
    ns = namespace or ns
    path = socketio_path or path
    if auth is FROM_ROOM:
        auth = {"name": name}
        if invite is FROM_ROOM:
            invite = room.get("invite") if isinstance(room, dict) else None
        if invite is not None:
            auth["invite"] = invite
        if last_seq is not None:
            auth["last_seq"] = last_seq
        if token is not None:
            auth["token"] = token
    sio = socketio.AsyncClient(reconnection=False)
    client = RoomClient(sio, ns)
    try:
        # wait=False: the outcome (welcome or CONNECT_ERROR) is awaited below, so that a
        # refusal does not sit in the client's own slow polling disconnect
        await sio.connect(node.base_url, namespaces=[ns], socketio_path=path,
                          transports=transport or ["websocket"], auth=auth, wait=False)
        outcome = await first_of(client.events["welcome"], client.connect_errors)
    except socketio.exceptions.ConnectionError as exc:
        await client.close()
        errors = [client.connect_errors.get_nowait() for _ in range(client.connect_errors.qsize())]
        raise AssertionError(f"the Engine.IO connection to {path} failed before any "
                             f"CONNECT_ERROR: {exc} (connect_error data: {errors})") from None
    except BaseException:
        await client.close()
        raise
    if outcome[0] is client.connect_errors:
        await client.close()
        raise Refused(outcome[1])
    client.welcome = outcome[1]
    return client


async def first_of(*queues: asyncio.Queue, timeout: float = EVENT_TIMEOUT
                   ) -> tuple[asyncio.Queue, Any]:
    """(queue, item) of whichever queue yields first within ``timeout`` seconds."""
    getters = {asyncio.ensure_future(q.get()): q for q in queues}
    try:
        done, _ = await asyncio.wait(getters, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in getters:
            task.cancel()
    if not done:
        raise AssertionError(f"neither welcome nor connect_error within {timeout}s")
    task = done.pop()
    return getters[task], task.result()


async def refusal(node: NodeProcess, room: dict[str, Any] | str, **kwargs: Any) -> Refused:
    """Connect expecting a refusal; returns it (fails the test if the connect succeeds)."""
    try:
        client = await open_client(node, room, **kwargs)
    except Refused as exc:
        return exc
    await client.close()
    raise AssertionError(f"connect to {room!r} with {kwargs} was accepted, expected a refusal")


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """``await connect(node, room, name=..., transport=..., invite=..., last_seq=...)``
    returns a joined RoomClient; every client is disconnected when the test ends."""
    opened: list[RoomClient] = []

    async def _connect(node: NodeProcess, room: dict[str, Any] | str, **kwargs: Any
                       ) -> RoomClient:
        client = await open_client(node, room, **kwargs)
        opened.append(client)
        return client

    yield _connect
    for client in opened:
        await client.close()


def assert_refusal_shape(refused: Refused, code: str) -> None:
    """SPEC 4: CONNECT_ERROR data is {"message": str, "data": {"code": C}}."""
    data = refused.data
    assert isinstance(data, dict), data
    assert refused.code == code, f"expected refusal {code!r}, got {data!r}"
    assert isinstance(data.get("message"), str) and data["message"].strip(), data


def assert_failed_ack(ack: Any, code: str) -> None:
    """SPEC 4: a failed request acks {"ok": false, "error": C, "message": str}."""
    assert isinstance(ack, dict), ack
    assert ack.get("ok") is False, ack
    assert ack.get("error") == code, f"expected error {code!r}, got {ack!r}"
    assert isinstance(ack.get("message"), str) and ack["message"].strip(), ack


async def paused_member(node: NodeProcess, room: dict[str, Any], name: str,
                        on_message: Callable[[SioClient, bytes], None] | None = None
                        ) -> SioClient:
    """A raw websocket member with a tiny receive buffer whose reading is paused once joined,
    so the node's backlog to it grows (``transport.resume_reading()`` lets it catch up)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", node.port))
    _, client = await loop.create_connection(
        lambda: SioClient("127.0.0.1", node.port, room["socketio_path"], room["namespace"],
                          {"name": name}, on_message=on_message), sock=sock)
    await asyncio.wait_for(asyncio.shield(client.connected), EVENT_TIMEOUT)
    client.transport.pause_reading()
    return client
