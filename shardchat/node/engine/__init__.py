"""The node's Socket.IO engine: the only package that touches library internals.

python-socketio, python-engineio and aiohttp are used through their public APIs everywhere
else. The *fast* engine (the default) also reaches into them where a chat spends its CPU
and memory: broadcasts written straight to sockets (``delivery.py``), incoming events
parsed once (``inbound.py``), websocket connections it takes from aiohttp after the
handshake and speaks itself (``session.py``, ``websocket.py``), its own queue and ping
timers (``sessionqueue.py``, ``liveness.py``, ``closing.py``), a server
subclass with five overrides (``server.py``) and a client manager whose leaves and lost
connections cost O(the member's own rooms), not a scan of the namespace or of every
namespace of the node (``manager.py``). Every private attribute or method it relies
on is in ``INTERNALS`` below, and ``build`` checks them all before the node serves: a
library upgrade that renames one stops the node at start-up with a line naming it and the
installed version, instead of failing deep inside a request later. ``pyproject.toml`` pins
the three libraries (``~=``) to the releases this list was checked against.

The *stock* engine (``[node] engine = "stock"``, ``stock.py``) is plain python-socketio
behind the same ``Delivery`` interface, with no bypass and no private attribute: the
fallback when an upgrade fails the self-check, slower but with the same rooms, refusals
and limits.

The room service sees only ``Delivery``; the node sees only ``Engine`` (and the Socket.IO
server it attaches to its app and registers its handlers on).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from shardchat.config import NodeSettings
from shardchat.node.engine import closing, liveness, session, sessionqueue
from shardchat.node.engine.delivery import FastDelivery
from shardchat.node.engine.inbound import Inbound
from shardchat.node.engine.server import ConnectedHook, NodeSocketServer, session_counts
from shardchat.node.engine.stock import StockEngine, StockServer
from shardchat.node.engine.wire import json_size
from shardchat.refusal import Refusal

__all__ = ["INTERNALS", "ConnectedHook", "Delivery", "Engine", "EngineIncompatible",
           "Internal", "SocketServer", "build", "check_internals", "install", "json_size"]

log = logging.getLogger("shardchat.engine")

# The Socket.IO server of either engine: the node registers its handlers on it (``sio.on``),
# sets its ``on_connected`` hook once, and attaches it to its aiohttp app.
SocketServer = NodeSocketServer | StockServer


class Delivery(Protocol):
    """What the room service may ask of the engine, and nothing else.

    A recipient is a member's (Socket.IO sid, Engine.IO sid); the room service keeps the
    latter from ``transport_id`` at join, which saves a lookup per recipient per event. A
    room's broadcast is the list of its ready members, one member's event a list of one."""

    async def emit(self, namespace: str, event: str, data: Any,
                   recipients: list[tuple[str, str | None]]) -> None:
        """Send ``event`` with ``data`` to each recipient, in the order events are emitted
        (every member sees its events in emit order, whatever path each one took)."""

    def emit_now(self, namespace: str, event: str, data: Any,
                 recipients: list[tuple[str, str | None]]) -> bool:
        """``emit`` done before it returns, in the same order as ``emit``; False (nothing
        sent) when this engine cannot, and the caller then awaits ``emit``."""

    def transport_id(self, namespace: str, sid: str) -> str | None:
        """The Engine.IO session id of a connected member (None: not connected)."""

    def backlogged(self, eio_sid: str | None) -> bool:
        """True when the member already holds more unsent bytes than
        ``node.write_buffer_cap`` (work that only makes more bytes for it is refused)."""

    async def disconnect(self, namespace: str, sid: str, refusal: Refusal) -> None:
        """Refuse a member whose CONNECT already went out: CONNECT_ERROR with the
        refusal's code, then its namespace is closed."""

    async def leave(self, namespace: str, sid: str) -> None:
        """Close a member's namespace (DISCONNECT), after everything emitted to it before;
        the connection of its other namespaces stays. Never raises."""

    def stats(self) -> dict[str, int]:
        """Counters of the paths deliveries took (``GET /internal/metrics``)."""


class Engine(Protocol):
    """What the node holds of its engine."""

    kind: str  # "fast" or "stock"
    sio: SocketServer
    delivery: Delivery

    def stats(self) -> dict[str, Any]:
        """``{"engine": kind, "fanout": {...}, "inbound": {...}, "sessions": {...}}`` for the
        metrics (``sessions``: ``server.session_counts``)."""

    def websocket_count(self) -> int:
        """Sessions on the websocket transport now (for the shutdown watchdog's log)."""

    async def close_sessions(self, timeout: float) -> dict[str, int]:
        """End every session so that its client reconnects (shutdown); counts per way."""


# -- the self-check ----------------------------------------------------------------------


class EngineIncompatible(RuntimeError):
    """The installed libraries lack something the fast engine relies on; the message names
    each missing attribute, its library's installed version and the way out."""


@dataclass(frozen=True)
class Internal:
    """One private (or undocumented) attribute or method of a library the fast engine uses.

    ``owner`` is the dotted path of the class (or module) that has it. Attributes set in
    ``__init__`` are looked for on an instance ``probe`` builds from the owner; ``params``
    are parameter names a method must still take; an ``optional`` one only costs memory
    when missing (the code skips it), so it is logged, not fatal."""

    owner: str
    name: str
    dist: str  # the distribution that ships it, for its version in the message
    why: str
    probe: Callable[[Any], Any] | None = None
    params: tuple[str, ...] = ()
    optional: bool = False

    @property
    def path(self) -> str:
        return f"{self.owner}.{self.name}"


def _server(cls: Any) -> Any:
    return cls(async_mode="aiohttp")  # an Engine.IO or a Socket.IO server


def _engineio_socket(cls: Any) -> Any:
    import engineio

    return cls(engineio.AsyncServer(async_mode="aiohttp"), "self-check")


_SIO, _EIO, _AIOHTTP, _PY = "python-socketio", "python-engineio", "aiohttp", "python"
_SERVER = "socketio.async_server.AsyncServer"
_SOCKET = "engineio.async_socket.AsyncSocket"
_MANAGER = "socketio.async_manager.AsyncManager"

# Every private attribute or method the fast engine relies on, and why. The stock engine
# uses none of them. Keep it complete: a name used in engine/ and missing here is a crash
# waiting for the next library release instead of a clear refusal at start-up.
INTERNALS: tuple[Internal, ...] = (
    # python-socketio: the server subclass (server.py) and the fast paths around it
    Internal(_SERVER, "_send_packet", _SIO, "server.py overrides it: packets take the direct path",
             params=("eio_sid", "pkt")),
    Internal(_SERVER, "_handle_event", _SIO, "server.py overrides it: refused event names",
             params=("eio_sid", "namespace", "id", "data")),
    Internal(_SERVER, "_handle_connect", _SIO, "server.py overrides it: the welcome after CONNECT",
             params=("eio_sid", "namespace", "data")),
    Internal(_SERVER, "_handle_eio_message", _SIO,
             "server.py overrides it: unreadable packets answered",
             params=("eio_sid", "data")),
    Internal(_SERVER, "_get_event_handler", _SIO, "inbound.py calls it: the handler of an event",
             params=("event", "namespace", "args")),
    Internal(_SERVER, "_handle_eio_disconnect", _SIO,
             "server.py overrides it: a lost connection visits its own namespaces only",
             params=("eio_sid", "reason")),
    Internal(_SERVER, "_handle_disconnect", _SIO,
             "server.py calls it for each namespace of a lost connection",
             params=("eio_sid", "namespace", "reason")),
    Internal(_SERVER, "environ", _SIO,
             "session.py trims it after the handshake, server.py forgets a lost session's",
             probe=_server, optional=True),
    # python-socketio's client manager: manager.py keeps an index of each sid's rooms
    *(Internal(_MANAGER, name, _SIO, "manager.py overrides it: leaves without a scan",
               params=params)
      for name, params in (("basic_enter_room", ("sid", "namespace", "room", "eio_sid")),
                           ("basic_leave_room", ("sid", "namespace", "room")),
                           ("basic_disconnect", ("sid", "namespace")))),
    *(Internal(_MANAGER, name, _SIO, "manager.py's disconnect reads and updates it",
               probe=lambda cls: cls())
      for name in ("rooms", "callbacks")),
    *(Internal(_MANAGER, name, _SIO, "manager.py keeps it as counted sets (O(1) lookups)",
               probe=lambda cls: cls())
      for name in ("pending_connect", "pending_disconnect")),
    # python-engineio: the websocket driver, the queue, the pings
    Internal("engineio.async_server.AsyncServer", "_async", _EIO,
             "session.py replaces the websocket driver in it", probe=_server),
    Internal("engineio.async_server.AsyncServer", "handlers", _EIO,
             "closing.py wraps python-socketio's disconnect handler in it", probe=_server),
    Internal(_SOCKET, "_websocket_handler", _EIO, "session.py takes over the sessions it runs",
             params=("ws",)),
    Internal(_SOCKET, "_send_ping", _EIO, "liveness.py turns the ping task into a timer"),
    *(Internal(_SOCKET, name, _EIO, "session.py and delivery.py read and set it",
               probe=_engineio_socket)
      for name in ("queue", "connected", "upgrading", "upgraded", "closing", "closed",
                   "last_ping")),
    # aiohttp: the connection taken from its request handler after the handshake
    Internal("aiohttp.web_ws.WebSocketResponse", "__init__", _AIOHTTP,
             "session.py: a wrapped handler's websocket, compression and bytes-only reads",
             params=("max_msg_size", "compress", "decode_text")),
    *(Internal("aiohttp.web_protocol.RequestHandler", name, _AIOHTTP,
               "session.py takes the connection from aiohttp after the handshake")
      for name in ("_message_tail", "_parser", "_manager", "_keepalive_handle")),
    # asyncio: a queue that is not our SessionQueue (someone replaced create_queue)
    *(Internal("asyncio.Queue", name, _PY, "delivery.py: is a writer parked on it",
               probe=lambda cls: cls()) for name in ("_getters", "_queue")),
)


def _resolve(dotted: str) -> Any:
    """The class (or module) at ``dotted``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def _problem(item: Internal) -> str | None:
    """Why ``item`` is not usable on the installed libraries, or None when it is."""
    try:
        owner = _resolve(item.owner)
    except (ImportError, AttributeError):
        return f"{item.owner} does not exist"
    target = owner
    if item.probe is not None:
        try:
            target = item.probe(owner)
        except Exception as exc:  # the constructor itself changed
            return f"{item.owner} cannot be built to look for {item.name} ({exc!r})"
    if not hasattr(target, item.name):
        return f"{item.path} does not exist"
    if item.params:
        try:
            taken = inspect.signature(getattr(target, item.name)).parameters
        except (TypeError, ValueError):
            return f"{item.path} has no readable signature"
        lost = [p for p in item.params if p not in taken]
        if lost:
            return f"{item.path} no longer takes {', '.join(lost)}"
    return None


def _version(dist: str) -> str:
    if dist == _PY:
        import platform

        return f"Python {platform.python_version()}"
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} (not installed)"


def _pins() -> dict[str, str]:
    """The versions this install of shardchat asks for, by distribution (its metadata)."""
    try:
        requires = importlib.metadata.requires("shardchat") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    pins = {}
    for line in requires:
        name = line.split(";")[0].strip()
        for dist in (_SIO, _EIO, _AIOHTTP):
            if name.startswith(dist) and name[len(dist):len(dist) + 1] in "~=<>!":
                pins[dist] = name
    return pins


def check_internals(internals: tuple[Internal, ...] = INTERNALS) -> list[str]:
    """Look for every internal the fast engine uses; raise EngineIncompatible naming each
    required one that is missing (with the installed version of its library and the way
    out), return what is wrong with the optional ones (the caller logs them)."""
    missing: list[str] = []
    optional: list[str] = []
    dists: set[str] = set()
    for item in internals:
        problem = _problem(item)
        if problem is None:
            continue
        line = f"{problem} in {_version(item.dist)} ({item.why})"
        if item.optional:
            optional.append(line)
        else:
            missing.append(line)
            dists.add(item.dist)
    if missing:
        pins = _pins()
        pinned = [pins[d] for d in sorted(dists) if d in pins]
        raise EngineIncompatible(
            "node.engine = \"fast\" cannot run on the installed libraries: "
            + "; ".join(missing)
            + (f". shardchat pins {', '.join(pinned)}" if pinned else "")
            + ". Install the versions shardchat pins, or set [node] engine = \"stock\" to "
            "run plain python-socketio without the fast path.")
    return optional


# -- building ----------------------------------------------------------------------------


class FastEngine:
    """The fast engine once installed: the server, its delivery and inbound path."""

    kind = "fast"

    def __init__(self, sio: NodeSocketServer, inbound: Inbound) -> None:
        self.sio = sio
        self.delivery: FastDelivery = sio.delivery
        self.inbound = inbound

    def stats(self) -> dict[str, Any]:
        return {"engine": self.kind, "fanout": self.delivery.stats(),
                "inbound": self.inbound.stats(), "sessions": session_counts(self.sio)}

    def websocket_count(self) -> int:
        return len(self.delivery.websocket_sids())

    async def close_sessions(self, timeout: float) -> dict[str, int]:
        return await closing.close_sessions(self.sio.eio, self.delivery, timeout)


def install(sio: NodeSocketServer, settings: NodeSettings) -> FastEngine:
    """Put the fast paths under ``sio``: our websocket driver (session loop, inbound
    dispatch), ping timers, lean queues, polls answered on close, bounded disconnects."""
    delivery = sio.delivery
    inbound = Inbound(sio, delivery)
    eio = sio.eio
    eio._async = dict(eio._async, websocket=session.websocket_class(
        settings.websocket_compression, delivery, inbound, getattr(sio, "environ", None)))
    liveness.PingTimers(eio, delivery)
    sessionqueue.install(eio)
    closing.answer_polls_on_close(eio)
    closing.bound_disconnect(eio)
    return FastEngine(sio, inbound)


def build(settings: NodeSettings) -> Engine:
    """The engine ``node.engine`` names. For "fast", ``check_internals`` runs first (before
    anything is patched), so an incompatible library is an EngineIncompatible here, at
    start-up, and nothing else."""
    if settings.engine == "stock":
        log.info("engine stock: plain python-socketio, no fast path")
        return StockEngine(settings)
    for line in check_internals():
        log.warning("engine self-check: %s; that saving is skipped", line)
    try:
        fast = install(NodeSocketServer(settings), settings)
    except RuntimeError as exc:  # install's own checks (closing.answer_polls_on_close)
        raise EngineIncompatible(f"node.engine = \"fast\": {exc}") from None
    log.info("engine fast: %d library internals checked", len(INTERNALS))
    return fast
