"""The fast engine's delivery: one event to many members, the hot path.

python-socketio delivers a broadcast by creating one asyncio task per recipient, each of
which puts the packet on that client's Engine.IO queue and wakes the client's writer task,
which then builds a WebSocket frame for it (and, with permessage-deflate, compresses it)
on its own. For a room of 500 that is 500 tasks, 500 wake-ups and 500 identical frames.

Here a broadcast encodes its Socket.IO packet once, builds the WebSocket frame once and
writes the same bytes straight to the transport of every recipient for which that cannot
reorder anything: the client is on the websocket transport, nothing is waiting in its
Engine.IO queue, and its session has no write pending (so nothing it took is still
waiting to be written). Everyone else (long-polling clients, clients in the middle of an
upgrade, clients with queued packets) takes python-socketio's normal path, so every client
still sees its packets in the order they were produced. An uncompressed frame is valid on
a connection that negotiated permessage-deflate (RSV1 clear), so the same bytes serve
browser clients too.

What this bypasses, and reads of the libraries' internals to do it (each is in the
engine's self-check list, ``engine/__init__.py``): python-socketio's and engineio's
``send`` for the queued path (one encode for all slow recipients, put straight on each
Engine.IO socket's ``queue`` in the same tick, see ``_queue_now``), and
``asyncio.Queue._getters`` / ``_queue`` for a queue that is not our ``SessionQueue``.

Nothing here awaits (``emit_now``, ``send_payload_now``): the message hot path
(``inbound.py``'s direct handlers) broadcasts and acks from the store's commit callback,
with no task and no future per message or per recipient.

Back-pressure: a client is cut off only for a backlog it fails to drain, never for the size
of one packet. Its backlog is what it has not taken yet: its transport's write buffer
(websocket), this tick's frames for it, and the packets in its Engine.IO queue
(``SessionQueue.nbytes``: a long-polling client that does not GET, a websocket client in
the middle of its upgrade). It is looked at after the writes, never before: after
each tick's flush for direct writes, after each queued packet otherwise. Above
``write_buffer_cap`` a clock starts; a client still above the cap ``write_buffer_grace``
seconds later is cut off, and one above twice the cap is cut off at once, which bounds what
a stalled reader can hold. One packet never does it alone: welcome and history pages are
bounded by ``max_page_bytes``, which is below the cap. A cut-off is logged and counted, and
the client's queued packets are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from itertools import islice
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from shardchat.config import NodeSettings
from shardchat.node.engine.wire import sio_payload, text_frame
from shardchat.refusal import Refusal

log = logging.getLogger("shardchat.fanout")


_JSON_KINDS = (sio_packet.EVENT, sio_packet.ACK)


class FastDelivery:
    """The fast engine's ``Delivery``: events to room members, the room service calls
    ``emit`` for every one. It also knows each client's websocket (the session loop
    registers it), which the direct writes, the pings and the shutdown use."""

    def __init__(self, sio: socketio.AsyncServer, settings: NodeSettings) -> None:
        self.sio = sio
        self.settings = settings
        self.cap = settings.write_buffer_cap
        self.grace = settings.write_buffer_grace
        self.fast = 0
        self.slow = 0
        self.dropped = 0  # clients cut off for their backlog
        self.caught_up = 0  # clients that went above the cap and were below it in time
        self.refusals = 0  # requests refused because their client was above the cap
        self.direct = 0  # single-recipient packets written straight to the transport
        self.queued = 0  # single-recipient packets that took the Engine.IO queue
        self._ws: dict[str, Any] = {}  # Engine.IO sid -> its session (session.EngineSession)
        # transport -> [Engine.IO sid, frame, frame, ...]: what this loop tick writes to it
        self._pending: dict[Any, list[Any]] = {}
        self._flush_scheduled = False
        self._over: set[str] = set()  # Engine.IO sids above the cap, their clock running

    # -- knowing each client's websocket -------------------------------------------------

    def register(self, eio_sid: str, ws: Any) -> None:
        """A client's websocket session announces itself once the client is on the
        websocket transport (and withdraws when its connection ends)."""
        self._ws[eio_sid] = ws

    def unregister(self, eio_sid: str) -> None:
        self._ws.pop(eio_sid, None)

    def websocket(self, eio_sid: str) -> Any:
        """The client's websocket session while it is on the websocket transport."""
        return self._ws.get(eio_sid)

    def websocket_sids(self) -> list[str]:
        """Engine.IO sids of every client on the websocket transport, now."""
        return list(self._ws)

    def _direct_transport(self, eio_sid: str, sock: Any) -> Any:
        """The transport to write to directly, or None when the normal path must be used.

        Direct is safe only while the Engine.IO writer task is parked on an empty queue:
        then everything it took earlier has been handed to the transport, and anything
        queued later wakes the writer after this tick's flush, so order is kept."""
        ws = self._ws.get(eio_sid)
        if ws is None or not sock.upgraded or sock.closing:
            return None
        if not _parked(sock.queue):
            return None
        return ws.writable()  # None once it is closing

    def _write(self, transport: Any, eio_sid: str, frame: bytes) -> None:
        """Queue ``frame`` for ``transport``; all frames of one loop tick for the same
        client go out in one write (group commit completes several messages at once)."""
        entry = self._pending.get(transport)
        if entry is None:
            self._pending[transport] = [eio_sid, frame]
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        else:
            entry.append(frame)

    def _flush(self) -> None:
        """One write per client of its frames of this tick, then one look at what its
        transport could not hand to the kernel: a client over the cap is judged."""
        pending, self._pending = self._pending, {}
        self._flush_scheduled = False
        cap = self.cap
        for transport, entry in pending.items():
            if transport.is_closing():
                continue
            transport.write(entry[1] if len(entry) == 2 else b"".join(islice(entry, 1, None)))
            if transport.get_write_buffer_size() > cap:
                self._judge(entry[0])

    # -- the room service's view (the Delivery protocol) ---------------------------------

    def transport_id(self, namespace: str, sid: str) -> str | None:
        """The Engine.IO session of a connected member (fixed for the connection's life)."""
        return self.sio.manager.eio_sid_from_sid(sid, namespace)

    async def disconnect(self, namespace: str, sid: str, refusal: Refusal) -> None:
        """Refuse a join after its CONNECT went out (the welcome could not be built):
        CONNECT_ERROR with the refusal's code, then the namespace is closed. Both official
        clients treat a CONNECT_ERROR as the end of that namespace whenever it comes."""
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        if eio_sid is not None:
            with contextlib.suppress(Exception):
                await self.send_packet(eio_sid, self.sio.packet_class(
                    sio_packet.CONNECT_ERROR, namespace=namespace,
                    data=refusal.connect_error()))
        with contextlib.suppress(Exception):
            await self.sio.disconnect(sid, namespace=namespace)

    async def leave(self, namespace: str, sid: str) -> None:
        """Close a member's namespace: the DISCONNECT takes ``send_packet``, the path of
        every single packet, so it follows what was emitted to the member before."""
        with contextlib.suppress(Exception):
            await self.sio.disconnect(sid, namespace=namespace)

    # -- broadcast -----------------------------------------------------------------------

    async def emit(self, namespace: str, event: str, data: Any,
                   recipients: list[tuple[str, str | None]]) -> None:
        """Send ``event`` with ``data`` to each (Socket.IO sid, Engine.IO sid) recipient:
        ``emit_now``, or python-socketio's own emit per recipient for data with binary
        attachments."""
        if self.emit_now(namespace, event, data, recipients):
            return
        for sid, _eio_sid in recipients:
            self.slow += 1
            await self.sio.emit(event, data, to=sid, namespace=namespace)

    def emit_now(self, namespace: str, event: str, data: Any,
                 recipients: list[tuple[str, str | None]]) -> bool:
        """``emit`` without awaiting: done when it returns (False, and nothing sent, for
        data with binary attachments, which only python-socketio's emit can send).

        The room service keeps each member's Engine.IO sid, which saves a lookup per
        recipient. No task per recipient: fast recipients get one ``transport.write`` of a
        shared frame; the rest get one shared Engine.IO packet put on their queue, in
        order (``_queue_now``).

        Per recipient the hot path does: one socket lookup, the direct-write test (its
        websocket is known, its writer is parked on an empty queue), and either an append
        of the shared frame to its list for this tick's flush or a place on the slow list.
        Back-pressure costs nothing here: it is one buffer-size look per client in the
        flush (direct writes) and one backlog measure per queued packet (slow path)."""
        payload = sio_payload(sio_packet.EVENT, namespace, [event, data])
        if payload is None:
            encoded = self.sio.packet_class(sio_packet.EVENT, namespace=namespace,
                                            data=[event, data]).encode()
            if isinstance(encoded, list):  # binary attachments: leave them to python-socketio
                return False
            payload = ("4" + encoded).encode()
        frame = text_frame(payload)  # built once, shared by every recipient
        slow: list[Any] | None = None
        sockets = self.sio.eio.sockets
        ws_of = self._ws
        pending = self._pending
        fast = 0
        # Once per member of the room: the session's own direct-write test and ``_write``,
        # inlined (a call and a lookup fewer per recipient).
        for _sid, eio_sid in recipients:
            ws = ws_of.get(eio_sid)
            transport = ws.direct() if ws is not None else None
            if transport is not None:
                entry = pending.get(transport)
                if entry is None:
                    pending[transport] = [eio_sid, frame]
                else:
                    entry.append(frame)
                fast += 1
                continue
            sock = sockets.get(eio_sid) if eio_sid is not None else None
            if sock is None or sock.closing:
                continue
            if slow is None:
                slow = [sock]
            else:
                slow.append(sock)
        if fast:
            self.fast += fast
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        if slow:
            pkt = eio_packet.Packet(eio_packet.MESSAGE, payload[1:].decode())
            for sock in slow:
                self.slow += 1
                self._queue_now(sock, pkt)
        return True

    def _queue_now(self, sock: Any, pkt: Any) -> None:
        """Put ``pkt`` on the client's Engine.IO queue, then judge its backlog.

        What engineio's ``AsyncSocket.send`` does, without its await: the queue is
        unbounded (``put_nowait`` never refuses), and its ping check is not needed here
        (a websocket's pings are ``liveness.py``'s timers, a long-poll's engineio's own
        service task), so a packet is queued in the same tick it was produced and nothing
        produced later can overtake it. A closed socket gets nothing, as engineio's
        ``send`` would refuse it."""
        if sock.closed:
            return
        sock.queue.put_nowait(pkt)
        self._judge(sock.sid)

    # -- one recipient -------------------------------------------------------------------

    async def send_packet(self, eio_sid: str, pkt: Any) -> bool:
        """python-socketio's ``_send_packet`` (CONNECT, CONNECT_ERROR, DISCONNECT, ACK and
        single emits) through the same direct-write rule as broadcasts. False when the
        packet has binary attachments: python-socketio then sends it as usual.

        Events and acks are encoded with orjson like everything else this node sends, so a
        history page has the size it was measured at on every transport (the stdlib's
        ``\\u`` escapes would triple the bytes of some texts)."""
        payload = None
        if pkt.packet_type in _JSON_KINDS and pkt.data is not None:
            payload = sio_payload(pkt.packet_type, pkt.namespace or "/", pkt.data, pkt.id)
        if payload is None:
            encoded = pkt.encode()
            if isinstance(encoded, list):
                return False
            payload = ("4" + encoded).encode()
        await self.send_payload(eio_sid, payload)
        return True

    async def send_payload(self, eio_sid: str, payload: bytes) -> None:
        """``send_payload_now``, for callers that await."""
        self.send_payload_now(eio_sid, payload)

    def send_payload_now(self, eio_sid: str, payload: bytes) -> None:
        """Send one Engine.IO MESSAGE payload (``4...``) to one client: written straight to
        the transport when that cannot reorder anything (see ``_direct_transport``), else
        put on the client's Engine.IO queue (``_queue_now``); dropped for a client that is
        gone, as engineio's ``send_packet`` drops it."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is None or self.write_now(eio_sid, sock, payload):
            return
        self.queued += 1
        self._queue_now(sock, eio_packet.Packet(eio_packet.MESSAGE, payload[1:].decode()))

    def transport_of(self, eio_sid: str) -> Any:
        """The asyncio transport under the client's websocket (None: not on websocket)."""
        ws = self._ws.get(eio_sid)
        return ws.transport if ws is not None else None

    def write_now(self, eio_sid: str, sock: Any, payload: bytes) -> bool:
        """Write ``payload`` to the client's socket now if the direct rule allows it, at any
        size (the flush judges the backlog); False: use the Engine.IO queue."""
        ws = self._ws.get(eio_sid)
        if ws is not None and ws.sock is sock:
            # The broadcast loop's one-call test (``EngineSession.direct``: no write of
            # queued packets scheduled or running, nothing queued, upgraded, not closing),
            # which implies ``_direct_transport``'s rule for the session's own queue.
            transport = ws.direct()
        elif sock.closing:
            return False
        else:
            transport = self._direct_transport(eio_sid, sock)
        if transport is None:
            return False
        self._write(transport, eio_sid, text_frame(payload))
        self.direct += 1
        return True

    # -- back-pressure -------------------------------------------------------------------

    def unsent(self, eio_sid: str, sock: Any = None) -> int:
        """Bytes this client has not taken yet: its transport's write buffer and this
        tick's frames (websocket), plus its queued packets (either transport)."""
        if sock is None:
            sock = self.sio.eio.sockets.get(eio_sid)
            if sock is None:
                return 0
        total = getattr(sock.queue, "nbytes", 0)
        transport = self.transport_of(eio_sid)
        if transport is not None:
            total += transport.get_write_buffer_size()
            entry = self._pending.get(transport)
            if entry is not None:
                total += sum(len(frame) for frame in islice(entry, 1, None))
        return total

    def backlogged(self, eio_sid: str | None) -> bool:
        """True when this client already holds more unsent bytes than the cap. Work whose
        only product is more bytes for it (a history page) is then refused (counted), so a
        client that does not read cannot make the node read and hold pages for it."""
        if eio_sid is None or self.unsent(eio_sid) <= self.cap:
            return False
        self.refusals += 1
        return True

    def _judge(self, eio_sid: str) -> None:
        """After a write or a queued packet: a client above twice the cap is cut off now;
        one above the cap gets ``grace`` seconds (one clock per episode) to get below."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is None or sock.closing:
            return
        unsent = self.unsent(eio_sid, sock)
        if unsent <= self.cap:
            return
        if unsent > 2 * self.cap:
            self._drop(eio_sid, sock, unsent, "more than twice node.write_buffer_cap")
        elif eio_sid not in self._over:
            self._over.add(eio_sid)
            asyncio.get_running_loop().call_later(self.grace, self._deadline, eio_sid)

    def _deadline(self, eio_sid: str) -> None:
        """``grace`` seconds after a client went above the cap: still above, it is cut off;
        below, it caught up, and a later excess starts a new clock."""
        if eio_sid not in self._over:
            return  # cut off meanwhile
        self._over.discard(eio_sid)
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is None or sock.closing:
            return
        unsent = self.unsent(eio_sid, sock)
        if unsent > self.cap:
            self._drop(eio_sid, sock, unsent, f"still above node.write_buffer_cap after "
                       f"{self.grace:g} s")
        else:
            self.caught_up += 1

    def _drop(self, eio_sid: str, sock: Any, unsent: int, why: str) -> None:
        """Cut off a reader that fell too far behind and free what was queued for it; the
        normal disconnect path (leave, presence) follows from the closed connection."""
        self.dropped += 1
        self._over.discard(eio_sid)
        transport = self.transport_of(eio_sid)
        log.warning("disconnecting slow reader %s (%s): %d bytes unsent, %s (%d)", eio_sid,
                    "websocket" if transport is not None else "long-polling", unsent, why,
                    self.cap)
        discard = getattr(sock.queue, "discard", None)
        if discard is not None:
            discard()
        if transport is not None and not transport.is_closing():
            transport.abort()
        else:
            task = asyncio.ensure_future(sock.close(wait=False, abort=True))
            task.add_done_callback(_ignore_result)

    def stats(self) -> dict[str, int]:
        return {"fast": self.fast, "slow": self.slow, "direct": self.direct,
                "queued": self.queued, "dropped_slow_readers": self.dropped,
                "backlogged": len(self._over), "caught_up": self.caught_up,
                "backlog_refusals": self.refusals}


def _parked(queue: Any) -> bool:
    """Nothing queued and the writer waiting in ``get`` (SessionQueue or asyncio.Queue)."""
    parked = getattr(queue, "parked", None)
    if parked is not None:
        return parked()
    getters = queue._getters
    return not queue._queue and bool(getters) and not getters[0].done()


def _ignore_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
