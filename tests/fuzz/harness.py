"""What every fuzz module shares: one real node, a room of well-behaved bystanders, and
hand-spoken clients that send what no real client would.

Hypothesis runs examples synchronously, but the bystanders must stay connected (and answer
pings) between examples, so every client lives on an asyncio loop in a thread of its own and
a test hands it coroutines (``Harness.run``). After each example ``Harness.check`` proves the
hostile input harmed nobody: the node process is alive and healthy, a well-behaved speaker's
canary message is acked and reaches a watcher in the same room, and a newcomer can still join
(its welcome carries the room's history, so a poisoned message would show there).

Each example starts from a healthy state (``Harness.ready``): when the previous check failed,
the node is restarted if it died and the bystanders move to a fresh room, so a failure is
blamed on the example that caused it and hypothesis shrinks towards the real culprit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, fields
from typing import Any

import aiohttp

from shardchat import urls
from shardchat.config import NodeSettings
from tests.conftest import RoomClient, acreate_room, open_client
from tests.support import NodeProcess

EVENT_TIMEOUT = 5.0
NO_ANSWER = "<no answer>"
# SPEC section 4: the codes a failed request may ack with
ACK_ERRORS = {"empty", "too_long", "rate_limited", "bad_request", "moved", "unavailable"}


def generous_limits() -> dict[str, Any]:
    """Node settings for fuzzing: every rate limit this node knows, raised out of reach.

    A rate limit counts per client address, and every fuzz client is on loopback: with the
    defaults, hundreds of hostile examples would throttle the bystanders' canary too. Keys
    are taken from the settings the node has, so the fuzz node never names an unknown one."""
    names = {f.name for f in fields(NodeSettings)}
    limits: dict[str, Any] = {name: 1_000_000 for name in names
                              if name.startswith("rate_limit_") and name != "rate_limit_window"}
    limits["drain_grace_seconds"] = 0.1  # the module's node stops quickly at the end
    return limits


class LoopThread:
    """An asyncio loop running in a daemon thread, fed coroutines from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what is still running (client read loops), then stop and close."""
        with contextlib.suppress(Exception):
            self.run(_cancel_others(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


async def _cancel_others() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Harness:
    """One node, one room with a ``watcher`` (websocket) and a ``speaker`` (long-polling)."""

    def __init__(self, node: NodeProcess) -> None:
        self.node = node
        self.loop = LoopThread()
        self.room: dict[str, Any] = {}
        self.watcher: RoomClient | None = None
        self.speaker: RoomClient | None = None
        self.session: aiohttp.ClientSession | None = None
        self.healthy = False
        self.canaries = 0
        self.rebuilds = 0
        self.top_seq = 0  # highest seq acked in the bystanders' room so far

    # -- plumbing -------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return self.loop.run(coro, timeout)

    @property
    def namespace(self) -> str:
        return self.room["namespace"]

    @property
    def eio_path(self) -> str:
        return urls.socketio_path(self.node.number)

    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.node.port}{self.eio_path}/?EIO=4&transport=websocket"

    def polling_url(self) -> str:
        return f"{self.node.base_url}{self.eio_path}/?EIO=4&transport=polling"

    async def http(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        return self.session

    # -- lifecycle ------------------------------------------------------------------------

    def ready(self) -> None:
        """Before an example: a live node and connected bystanders in an unharmed room."""
        if self.healthy and self.watcher and self.watcher.connected and self.speaker \
                and self.speaker.connected:
            return
        self.rebuilds += 1
        self.run(self._drop_bystanders())
        if self.node.proc is None or self.node.proc.poll() is not None:
            self.node.start()
        self.run(self._join_bystanders())
        self.healthy = True

    async def _join_bystanders(self) -> None:
        self.room = await acreate_room(self.node, "fuzz bystanders")
        self.top_seq = 0
        self.watcher = await open_client(self.node, self.room, name="watcher",
                                         transport=["websocket"])
        self.speaker = await open_client(self.node, self.room, name="speaker",
                                         transport=["polling"])

    async def _drop_bystanders(self) -> None:
        for client in (self.watcher, self.speaker):
            if client is not None:
                await client.close()
        self.watcher = self.speaker = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._drop_bystanders(), timeout=30)
        if self.session is not None:
            with contextlib.suppress(Exception):
                self.run(self.session.close(), timeout=10)
        self.loop.close()

    # -- the property every example must keep ---------------------------------------------

    def check(self, what: str = "the last input", expect: dict[int, str] | None = None
              ) -> None:
        """Hostile input harmed nobody; raises AssertionError naming ``what`` otherwise.

        ``expect`` maps the seq of each message the hostile client had acked to its text:
        the watcher must have received each of them, exactly as sent, before the canary."""
        self.healthy = False
        node = self.node
        assert node.proc is not None and node.proc.poll() is None, (
            f"the node process died after {what}:\n{node.log()}")
        status, body = node.healthz()
        assert status == 200 and isinstance(body, dict) and body.get("status") == "ok", (
            f"/i{node.number}/healthz answered {status} {body!r} after {what}")
        self.run(self._canary(what, expect or {}))
        self.healthy = True

    async def _canary(self, what: str, expect: dict[int, str]) -> None:
        watcher, speaker = self.watcher, self.speaker
        assert watcher is not None and speaker is not None
        assert watcher.connected, f"the watcher was disconnected after {what}"
        assert speaker.connected, f"the speaker was disconnected after {what}"
        self.canaries += 1
        text = f"canary {self.canaries}"
        try:
            ack = await speaker.call("message", {"text": text, "client_id": f"c{self.canaries}"},
                                     timeout=EVENT_TIMEOUT)
        except TimeoutError:
            raise AssertionError(f"the speaker's canary got no ack after {what}") from None
        assert isinstance(ack, dict) and ack.get("ok") is True, (
            f"the speaker's canary was refused after {what}: {ack!r}")
        await self._watch_for(text, ack["seq"], what, expect)
        self.top_seq = max(self.top_seq, ack["seq"])
        for event in ("presence", "typing", "welcome"):
            watcher.pending(event)  # bystanders see hostile joins and typing: not kept
            speaker.pending(event)
        speaker.pending("message")
        newcomer = await open_client(self.node, self.room, name="newcomer")
        try:
            history = newcomer.welcome.get("history")
            assert isinstance(history, list) and history and history[-1]["text"] == text, (
                f"a newcomer's welcome does not end with the canary after {what}: "
                f"{str(history)[-300:]}")
        finally:
            await newcomer.close()

    async def _watch_for(self, text: str, seq: int, what: str, expect: dict[int, str]
                         ) -> None:
        """The watcher gets the canary, and before it every message in ``expect``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EVENT_TIMEOUT
        seen: dict[int, Any] = {}
        for _ in range(10_000):
            try:
                msg = await self.watcher.next("message", max(0.01, deadline - loop.time()))
            except AssertionError:
                raise AssertionError(f"the watcher never got the canary after {what}") from None
            if msg.get("text") == text:
                assert msg.get("seq") == seq, (msg, seq)
                break
            seen[msg.get("seq")] = msg.get("text")
        else:
            raise AssertionError(f"the watcher never got the canary after {what}")
        for want_seq, want_text in expect.items():
            assert want_seq in seen, (
                f"message seq {want_seq} was acked but never reached the watcher ({what})")
            assert seen[want_seq] == want_text, (
                f"message seq {want_seq} reached the watcher as {seen[want_seq]!r}, "
                f"sent as {want_text!r} ({what})")


# ---------------------------------------------------------------------------------------
# hand-spoken Engine.IO sessions


class RawWebSocket:
    """An Engine.IO v4 websocket spoken by hand (pings answered, frames sent raw)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.open_packet = ""

    @classmethod
    async def open(cls, harness: Harness) -> RawWebSocket:
        session = await harness.http()
        ws = await session.ws_connect(harness.ws_url(), autoping=True, max_msg_size=0)
        sock = cls(ws)
        opening = await sock.read()
        assert isinstance(opening, str) and opening.startswith("0{"), opening
        sock.open_packet = opening
        return sock

    async def send(self, frame: str | bytes, text: bool = True) -> bool:
        """Send one frame as a TEXT (possibly invalid UTF-8) or BINARY message; False when
        the node has already closed the socket."""
        if self.ws.closed:
            return False
        data = frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame
        opcode = aiohttp.WSMsgType.TEXT if text else aiohttp.WSMsgType.BINARY
        try:
            await self.ws.send_frame(data, opcode)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False
        return True

    async def read(self, timeout: float = EVENT_TIMEOUT) -> str | None:
        """The next text frame (answering Engine.IO pings), None once closed, NO_ANSWER when
        nothing comes within ``timeout`` seconds. Binary frames are skipped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(10_000):
            try:
                msg = await asyncio.wait_for(self.ws.receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                return NO_ANSWER
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                return None
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "2":
                    await self.send("3")
                    continue
                return msg.data
        raise AssertionError("too many frames")

    async def until(self, prefix: str, timeout: float = EVENT_TIMEOUT) -> str | None:
        """Read until a frame starting with ``prefix``; None / NO_ANSWER as ``read``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(10_000):
            frame = await self.read(max(deadline - loop.time(), 0))
            if frame is None or frame == NO_ANSWER or frame.startswith(prefix):
                return frame
        raise AssertionError(f"no frame starting with {prefix!r}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


class RawPolling:
    """An Engine.IO v4 long-polling session spoken by hand.

    A reader task keeps one GET pending, as a real client does, and queues every packet it
    returns; POSTs carry whatever body the test chooses."""

    def __init__(self, harness: Harness, sid: str) -> None:
        self.harness = harness
        self.url = f"{harness.polling_url()}&sid={sid}"
        self.packets: asyncio.Queue[str | None] = asyncio.Queue()
        self.statuses: list[tuple[int, str, bytes]] = []
        self.reader: asyncio.Task | None = None
        self.closed = False

    @classmethod
    async def open(cls, harness: Harness) -> RawPolling:
        session = await harness.http()
        async with session.get(harness.polling_url()) as resp:
            opening = await resp.text()
        assert opening.startswith("0{"), opening
        sock = cls(harness, json.loads(opening[1:])["sid"])
        sock.reader = asyncio.ensure_future(sock._read_forever())
        return sock

    async def _read_forever(self) -> None:
        session = await self.harness.http()
        try:
            for _ in range(100_000):
                async with session.get(self.url) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        break
                text = body.decode("utf-8", "replace")
                for packet in text.split("\x1e"):
                    if packet == "2":
                        await self.post(b"3")
                    elif packet == "1":
                        return
                    elif packet != "6":
                        self.packets.put_nowait(packet)
        except (aiohttp.ClientError, TimeoutError):
            pass
        finally:
            self.closed = True
            self.packets.put_nowait(None)

    async def post(self, body: bytes, headers: dict[str, str] | None = None) -> int:
        """POST ``body``; returns the status and keeps (status, content type, body)."""
        session = await self.harness.http()
        async with session.post(self.url, data=body, headers=headers) as resp:
            raw = await resp.read()
            self.statuses.append((resp.status, resp.content_type, raw))
            return resp.status

    async def send(self, frame: str | bytes, text: bool = True) -> bool:
        """One packet per POST (binary ones base64-encoded, as Engine.IO asks)."""
        if self.closed:
            return False
        if isinstance(frame, str):
            frame = frame.encode("utf-8", "surrogatepass")
        if not text:
            frame = b"b" + base64.b64encode(frame)
        return await self.post(frame) == 200

    async def read(self, timeout: float = EVENT_TIMEOUT) -> str | None:
        try:
            return await asyncio.wait_for(self.packets.get(), timeout)
        except TimeoutError:
            return NO_ANSWER

    async def until(self, prefix: str, timeout: float = EVENT_TIMEOUT) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for _ in range(10_000):
            packet = await self.read(max(deadline - loop.time(), 0))
            if packet is None or packet == NO_ANSWER or packet.startswith(prefix):
                return packet
        raise AssertionError(f"no packet starting with {prefix!r}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.closed:
                await self.post(b"1")
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader


async def open_raw(harness: Harness, transport: str) -> RawWebSocket | RawPolling:
    if transport == "websocket":
        return await RawWebSocket.open(harness)
    return await RawPolling.open(harness)


async def join(sock: RawWebSocket | RawPolling, namespace: str, name: str = "mallory"
               ) -> str | None:
    """Send a namespace CONNECT; the node's answer (CONNECT or CONNECT_ERROR)."""
    await sock.send(f"40{namespace},{json.dumps({'name': name})}")
    answer = await sock.until("4", EVENT_TIMEOUT)
    for _ in range(100):
        if answer is None or answer == NO_ANSWER or answer.startswith(
                (f"40{namespace},", f"44{namespace},")):
            return answer
        answer = await sock.until("4", EVENT_TIMEOUT)
    return answer


# ---------------------------------------------------------------------------------------
# raw HTTP: any bytes in the request line and headers


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


async def raw_http(port: int, request: bytes, timeout: float = 10.0) -> RawAnswer | None:
    """Send ``request`` verbatim to 127.0.0.1:``port`` and read the answer until the node
    closes; None when the node closed without any HTTP answer (a refused request line)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    match = _STATUS.match(head)
    if match is None:
        return None
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawAnswer(int(match.group(1)), headers, body)


def _dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    for _ in range(100_000):
        end = body.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(body[pos:end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


def assert_error_shape(answer: RawAnswer, what: str) -> None:
    """SPEC 3: an HTTP error is JSON {"error": code, "message": sentence}."""
    assert answer.content_type == "application/json", (
        f"{what}: {answer.status} answered as {answer.content_type or 'no type'}: "
        f"{answer.body[:200]!r}")
    try:
        body = answer.json()
    except ValueError:
        raise AssertionError(f"{what}: {answer.status} with a body that is not JSON: "
                             f"{answer.body[:200]!r}") from None
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], (
        f"{what}: {answer.status} error body without a code: {body!r}")
    assert isinstance(body.get("message"), str) and body["message"].strip(), (
        f"{what}: {answer.status} error body without a message: {body!r}")
