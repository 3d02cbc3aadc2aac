"""The local router: an Application Load Balancer in miniature, for laptops and tests.

It evaluates a ``RuleSet`` exactly as ALB evaluates listener rules (see ``rules.py``) and
forwards each request, unchanged, to a target:

* the path that rules see is the raw request path: no percent-decoding, no collapsing of
  ``//``, no dot-segment removal, query string ignored (ALB matches what the client sent);
* a rule forwards to its one instance; the default action round-robins over the default
  instances whose health checks pass. Health: ``GET /i<N>/healthz`` every
  ``health_interval`` s; ``unhealthy_threshold`` failures in a row take a target out,
  ``healthy_threshold`` passes bring it back; at start-up one pass is enough. When every
  target of a group is unhealthy, requests go to all of them anyway ("fail open", as ALB);
* a target that cannot be connected to (refused, or no TCP connection within
  ``connect_timeout``) is marked unhealthy at once, as if it had failed its health checks,
  and a request of the default action that hit it is sent to the next target of the group:
  nothing of it reached the first one, so nothing can happen twice. A request that may have
  reached a target (the connection broke later) is never retried. A rule's request has no
  other target to go to. This is where the router is kinder than ALB, which answers 502
  until its health checks catch up (``docs/aws.md``);
* answers that come from the router itself are JSON: 502 ``bad_gateway`` (target refused
  or broke the connection), 504 ``gateway_timeout`` (no TCP connection within
  ``connect_timeout``, or no answer within ``idle_timeout``), 503 ``no_target`` (the group
  has no registered target), 413 ``too_large`` (a body over ``RouterLimits.max_body_bytes``);
* HTTP of any method is streamed both ways (hop-by-hop headers removed, bodies and
  encodings untouched); WebSocket upgrades are proxied frame by frame in both directions
  (text, binary, ping, pong, close with its code), without adding compression;
* nothing a client sends is buffered without bound: request bodies are streamed and cut off
  at ``max_body_bytes`` (the most any node accepts), a client's WebSocket frame over
  ``max_frame_bytes`` (``node.max_packet_bytes``) closes that WebSocket with 1009 "message
  too big" before its payload is read, and the listener has the header and idle timeouts of
  ``shardchat.listener``. Frames from the nodes are not capped: the nodes bound their own;
* ``X-Forwarded-For`` (appended), ``X-Forwarded-Proto`` and ``X-Forwarded-Port`` are set.

The router takes a RuleSet plus ``{instance: (host, port)}``, so it runs equally on rules
built from the config and on rules read back from a live ALB (``alb_rules.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from shardchat import urls
from shardchat.cluster.rules import RuleSet
from shardchat.config import Config
from shardchat.http_errors import json_error
from shardchat.listener import ListenerTimeouts, start_site

log = logging.getLogger(__name__)

Target = tuple[str, int]

HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade"))
WS_HANDSHAKE = frozenset(h.lower() for h in (
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept"))
CHUNK = 64 * 1024
UNSENDABLE = frozenset((1005, 1006, 1015))  # close codes that must never go on the wire


@dataclass(frozen=True)
class HealthSettings:
    interval: float = 1.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2


@dataclass(frozen=True)
class RouterLimits:
    """What one client may make the router hold: see the module docstring."""

    max_frame_bytes: int = 64 * 1024
    max_body_bytes: int = 64 * 1024 + 1024
    timeouts: ListenerTimeouts = field(default_factory=ListenerTimeouts)

    @classmethod
    def from_config(cls, cfg: Config) -> RouterLimits:
        """The nodes' own limits: what a node would refuse is refused here, early."""
        n = cfg.node
        return cls(max_frame_bytes=n.max_packet_bytes,
                   max_body_bytes=max(n.max_body_bytes, n.max_packet_bytes) + 1024,
                   timeouts=ListenerTimeouts.from_config(cfg))


@dataclass
class TargetHealth:
    """ALB-style state of one target: a streak of passes or failures flips it."""

    healthy: bool = False
    checked: bool = False
    passes: int = 0
    failures: int = 0
    reason: str = "not checked yet"

    def record(self, ok: bool, reason: str, settings: HealthSettings) -> bool:
        """Count one check; returns True when the state flipped."""
        if ok:
            self.passes, self.failures = self.passes + 1, 0
        else:
            self.passes, self.failures = 0, self.failures + 1
        self.reason = reason
        before = self.healthy
        if not self.checked:
            self.healthy = ok
        elif ok and self.passes >= settings.healthy_threshold:
            self.healthy = True
        elif not ok and self.failures >= settings.unhealthy_threshold:
            self.healthy = False
        self.checked = True
        return before != self.healthy

    def fail_now(self, reason: str, settings: HealthSettings) -> bool:
        """Out at once, as after ``unhealthy_threshold`` failed checks; True if it flipped."""
        before = self.healthy
        self.healthy, self.checked, self.reason = False, True, reason
        self.passes, self.failures = 0, max(self.failures, settings.unhealthy_threshold)
        return before


class NoTarget(Exception):
    """The matched target group has no registered target."""


class Unreachable(Exception):
    """No connection to the target could be made: nothing of the request reached it."""

    def __init__(self, number: int, cause: Exception):
        super().__init__(f"instance {number}: {cause!r}")
        self.number = number
        self.cause = cause


class BodyTooLarge(Exception):
    """The client's request body passed ``RouterLimits.max_body_bytes``."""


class _Body:
    """A client's request body, streamed to the target in chunks and counted on the way.

    ``started`` tells whether any of it was sent (a request whose body was never read can be
    sent elsewhere); passing ``limit`` raises BodyTooLarge, which aborts the upstream
    request, so a target never receives a cut-off body as if it were whole."""

    def __init__(self, request: web.Request, limit: int):
        self._request = request
        self._limit = limit
        self.started = False
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        total = 0
        async for chunk in self._request.content.iter_chunked(CHUNK):
            total += len(chunk)
            if total > self._limit:
                self.too_large = True
                raise BodyTooLarge()
            yield chunk


def _forward_headers(request: web.Request, drop: frozenset[str] = frozenset()
                     ) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones, plus the X-Forwarded-* trio."""
    listed = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in request.headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in listed or low in drop or low.startswith("x-forwarded-"):
            continue
        out.add(key, value)
    prior = request.headers.get("X-Forwarded-For")
    client = request.remote or "unknown"
    out["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    out["X-Forwarded-Proto"] = request.scheme
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if sock:
        out["X-Forwarded-Port"] = str(sock[1])
    return out


def _is_websocket(request: web.Request) -> bool:
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    return request.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection


def _raw_target(request: web.Request) -> str:
    """Path and query exactly as the client sent them (origin-form)."""
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    return request.rel_url.raw_path_qs  # absolute-form request line


def _unique_priorities(rules: RuleSet) -> RuleSet:
    """``rules`` (already in evaluation order: RuleSet keeps them so), refused when two
    share a priority, a mistake ALB itself would refuse."""
    for a, b in itertools.pairwise(rules.rules):
        if a.priority == b.priority:
            raise ValueError(f"rules {a.path_pattern!r} and {b.path_pattern!r} share priority "
                             f"{a.priority}; every rule needs its own priority")
    return rules


class Router:
    """Evaluates the rules per request and proxies to the chosen target."""

    def __init__(self, rules: RuleSet, targets: Mapping[int, Target], *,
                 health: HealthSettings | None = None, connect_timeout: float = 10.0,
                 idle_timeout: float = 60.0, limits: RouterLimits | None = None):
        self.rules = _unique_priorities(rules)
        self.targets = dict(targets)
        self.limits = limits or RouterLimits()
        self.health_settings = health or HealthSettings()
        self.health = {n: TargetHealth() for n in self.targets}
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._rr = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._checker: asyncio.Task[None] | None = None
        self._sockets: set[web.WebSocketResponse] = set()

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        """An aiohttp app whose only route sends everything through the rules."""
        app = web.Application(client_max_size=0)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(lambda _app: self.start())
        app.on_shutdown.append(lambda _app: self._close_sockets())
        app.on_cleanup.append(lambda _app: self.close())
        return app

    async def start(self) -> None:
        """Open the upstream session and run one health round before serving."""
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout,
                                          sock_read=self._idle_timeout))
        await self.check_health()
        self._checker = asyncio.create_task(self._health_loop(), name="router-health")

    async def _close_sockets(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"router stopping")

    async def close(self) -> None:
        if self._checker:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        if self._session:
            await self._session.close()
            self._session = None

    # -- health ---------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_settings.interval)
            try:
                await self.check_health()
            except Exception:  # one broken round must not end health checking
                log.exception("health round failed")

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(n) for n in self.targets))

    async def _check(self, n: int) -> None:
        assert self._session is not None
        host, port = self.targets[n]
        url = f"http://{host}:{port}{urls.healthz_path(n)}"
        timeout = aiohttp.ClientTimeout(total=self.health_settings.timeout)
        try:
            async with self._session.get(url, timeout=timeout) as resp:
                await resp.read()
                ok, reason = resp.status == 200, f"healthz answered {resp.status}"
        except TimeoutError:
            ok, reason = False, f"no healthz answer within {self.health_settings.timeout:g} s"
        except aiohttp.ClientError as exc:
            ok, reason = False, f"unreachable ({exc.__class__.__name__})"
        first = not self.health[n].checked
        flipped = self.health[n].record(ok, reason, self.health_settings)
        if (flipped and not first) or (first and not ok):  # start-up passes are not news
            state = "healthy" if ok else f"unhealthy: {reason}"
            log.info("target %s (%s:%s) is %s", n, host, port, state)

    def healthy(self) -> list[int]:
        return [n for n, h in self.health.items() if h.healthy]

    def mark_down(self, n: int, reason: str) -> None:
        """Take target ``n`` out now; its health checks bring it back as usual."""
        if self.health[n].fail_now(reason, self.health_settings):
            host, port = self.targets[n]
            log.info("target %s (%s:%s) is unhealthy: %s", n, host, port, reason)

    # -- routing --------------------------------------------------------------------------

    def candidates(self, path: str) -> list[int]:
        """The instances this request may go to, in order: a rule's one instance, or the
        default action's pool starting at its round-robin turn (the rest are where a
        request goes when the one before refused the connection). Raises NoTarget for an
        empty group."""
        rule = self.rules.match(path)
        if rule is not None:
            if rule.instance not in self.targets:
                raise NoTarget(f"rule {rule.priority} ({rule.path_pattern}) forwards to "
                               f"instance {rule.instance}, which has no registered target")
            return [rule.instance]
        group = [n for n in self.rules.default_instances if n in self.targets]
        if not group:
            raise NoTarget("the default action has no registered target")
        pool = [n for n in group if self.health[n].healthy] or group  # fail open
        turn = next(self._rr) % len(pool)
        return pool[turn:] + pool[:turn]

    def pick(self, path: str) -> int:
        """The instance this request goes to first; raises NoTarget for an empty group."""
        return self.candidates(path)[0]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = _raw_target(request)
        try:
            order = self.candidates(raw.split("?", 1)[0])
        except NoTarget as exc:
            return json_error(503, "no_target", f"No server can take this request: {exc}.")
        if (request.content_length or 0) > self.limits.max_body_bytes:
            return _too_large(self.limits.max_body_bytes)
        for attempt, n in enumerate(order):
            host, port = self.targets[n]
            url = URL(f"http://{host}:{port}{raw}", encoded=True)
            try:
                if _is_websocket(request):
                    return await self._websocket(request, n, url)
                return await self._http(request, n, url)
            except Unreachable as exc:
                self.mark_down(n, f"connection failed ({exc.cause.__class__.__name__})")
                if attempt + 1 < len(order):
                    log.info("instance %s refused %s %s; sent to instance %s instead", n,
                             request.method, request.path, order[attempt + 1])
                    continue
                return _unreachable(n, exc.cause)
        raise AssertionError("candidates() is never empty")

    # -- plain HTTP -----------------------------------------------------------------------

    async def _http(self, request: web.Request, n: int, url: URL) -> web.StreamResponse:
        """Relay one request; raises Unreachable when it could be sent elsewhere."""
        assert self._session is not None
        body = _Body(request, self.limits.max_body_bytes) if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method, url, headers=_forward_headers(request), data=body,
                allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            if body is None or not body.started:
                raise Unreachable(n, exc) from None
            return _unreachable(n, exc)
        except BodyTooLarge:
            return _too_large(self.limits.max_body_bytes, close=True)
        except aiohttp.ServerTimeoutError:
            return json_error(504, "gateway_timeout", f"Instance {n} did not answer in time.")
        except aiohttp.ClientError as exc:
            if body is not None and body.too_large:
                return _too_large(self.limits.max_body_bytes, close=True)
            return _unreachable(n, exc)
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    resp.headers.add(key, value)
            try:
                await resp.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except (aiohttp.ClientError, ConnectionError) as exc:
                # either side went away mid-answer (a client closing a long-poll is routine)
                log.debug("relay to or from instance %s broke off: %r", n, exc)
                resp.force_close()
            return resp

    # -- WebSocket ------------------------------------------------------------------------

    async def _websocket(self, request: web.Request, n: int, url: URL) -> web.StreamResponse:
        assert self._session is not None
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "")
                   .split(",") if p.strip()]
        try:
            upstream = await self._session.ws_connect(
                url, headers=_forward_headers(request, WS_HANDSHAKE), protocols=offered,
                autoclose=False, autoping=False, compress=0, max_msg_size=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise Unreachable(n, exc) from None
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if exc.status >= 400 else 502
            return json_error(status, "upgrade_refused", f"Instance {n} refused the WebSocket "
                          f"upgrade ({exc.status}).")
        except aiohttp.ServerTimeoutError:
            return json_error(504, "gateway_timeout", f"Instance {n} did not answer in time.")
        except aiohttp.ClientError as exc:
            return _unreachable(n, exc)
        # A client frame over the cap is refused from its header (1009), never buffered.
        down = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False, autoping=False, compress=False,
            max_msg_size=self.limits.max_frame_bytes)
        try:
            await down.prepare(request)
        except Exception:
            await upstream.close()
            raise
        self._sockets.add(down)
        try:
            await _pump_both(down, upstream)
        finally:
            self._sockets.discard(down)
        return down


def _unreachable(n: int, exc: Exception) -> web.Response:
    return json_error(502, "bad_gateway", f"Instance {n} could not be reached "
                  f"({exc.__class__.__name__}); it may be down or restarting.")


def _too_large(limit: int, close: bool = False) -> web.Response:
    """413 for a body over the cap; ``close``: the unread rest of it is not waited for."""
    resp = json_error(413, "too_large", f"The request body is larger than {limit} bytes, more "
                  "than any chat server accepts.")
    if close:
        resp.force_close()
    return resp


async def _pump(src, dst) -> None:
    """Copy frames from ``src`` to ``dst`` until either side closes."""
    while True:
        msg = await src.receive()
        if msg.type is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            code = msg.data if isinstance(msg.data, int) and msg.data not in UNSENDABLE else 1000
            await dst.close(code=code, message=(msg.extra or "").encode())
            return
        else:  # CLOSING, CLOSED, ERROR: the connection is gone
            if msg.type is WSMsgType.ERROR and isinstance(msg.data, aiohttp.WebSocketError) \
                    and msg.data.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                log.warning("closed a websocket (1009): %s", msg.data)
                with contextlib.suppress(Exception):
                    await dst.close(code=aiohttp.WSCloseCode.GOING_AWAY,
                                    message=b"peer sent a message too big")
            return


async def _pump_both(down: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse) -> None:
    tasks = [asyncio.create_task(_pump(down, up)), asyncio.create_task(_pump(up, down))]
    try:
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for ws in (up, down):
            with contextlib.suppress(Exception):
                await ws.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() and not isinstance(
                t.exception(), ConnectionError | aiohttp.ClientError):
            log.warning("websocket relay failed: %r", t.exception())


async def serve(router: Router, host: str, port: int) -> web.AppRunner:
    """Start the router on host:port; the caller cleans up the returned runner."""
    runner = web.AppRunner(router.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await start_site(runner, host, port, router.limits.timeouts)
    except BaseException:
        await runner.cleanup()
        raise
    return runner
