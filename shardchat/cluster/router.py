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
* answers that come from the router itself are JSON: 502 ``bad_gateway`` (target refused
  or broke the connection), 504 ``gateway_timeout`` (no TCP connection within
  ``connect_timeout``, or no answer within ``idle_timeout``), 503 ``no_target`` (the group
  has no registered target);
* HTTP of any method is streamed both ways (hop-by-hop headers removed, bodies and
  encodings untouched); WebSocket upgrades are proxied frame by frame in both directions
  (text, binary, ping, pong, close with its code), without adding compression;
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
from dataclasses import dataclass

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from shardchat import urls
from shardchat.cluster.rules import RuleSet

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


class NoTarget(Exception):
    """The matched target group has no registered target."""


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


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
                 idle_timeout: float = 60.0):
        self.rules = _unique_priorities(rules)
        self.targets = dict(targets)
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

    # -- routing --------------------------------------------------------------------------

    def pick(self, path: str) -> int:
        """The instance this request goes to; raises NoTarget for an empty group."""
        rule = self.rules.match(path)
        if rule is not None:
            if rule.instance not in self.targets:
                raise NoTarget(f"rule {rule.priority} ({rule.path_pattern}) forwards to "
                               f"instance {rule.instance}, which has no registered target")
            return rule.instance
        group = [n for n in self.rules.default_instances if n in self.targets]
        if not group:
            raise NoTarget("the default action has no registered target")
        pool = [n for n in group if self.health[n].healthy] or group  # fail open
        return pool[next(self._rr) % len(pool)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = _raw_target(request)
        try:
            n = self.pick(raw.split("?", 1)[0])
        except NoTarget as exc:
            return _error(503, "no_target", f"No server can take this request: {exc}.")
        host, port = self.targets[n]
        url = URL(f"http://{host}:{port}{raw}", encoded=True)
        if _is_websocket(request):
            return await self._websocket(request, n, url)
        return await self._http(request, n, url)

    # -- plain HTTP -----------------------------------------------------------------------

    async def _http(self, request: web.Request, n: int, url: URL) -> web.StreamResponse:
        assert self._session is not None
        data = _stream_body(request) if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method, url, headers=_forward_headers(request), data=data,
                allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"))
        except aiohttp.ServerTimeoutError:
            return _error(504, "gateway_timeout", f"Instance {n} did not answer in time.")
        except aiohttp.ClientError as exc:
            return _error(502, "bad_gateway", f"Instance {n} could not be reached "
                          f"({exc.__class__.__name__}); it may be down or restarting.")
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
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if exc.status >= 400 else 502
            return _error(status, "upgrade_refused", f"Instance {n} refused the WebSocket "
                          f"upgrade ({exc.status}).")
        except aiohttp.ServerTimeoutError:
            return _error(504, "gateway_timeout", f"Instance {n} did not answer in time.")
        except aiohttp.ClientError as exc:
            return _error(502, "bad_gateway", f"Instance {n} could not be reached "
                          f"({exc.__class__.__name__}); it may be down or restarting.")
        down = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False, autoping=False, compress=False, max_msg_size=0)
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


async def _stream_body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk


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
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
