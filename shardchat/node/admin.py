"""``GET /admin``: the ops page, on the internal listener, behind the cluster secret.

One page shows every instance as this node sees it: reachable or not, its connections,
rooms and load, messages stored, its follower, its off-machine copy, and whether its path
rule routes to it. A person opens it in a browser, which cannot send the peers' bearer
token, so ``/admin`` also takes HTTP Basic auth with the cluster secret as the password
(``internal_api.authorized_person``); the browser asks once and sends it with the page's
own requests. The page (``web/admin.html``, ``admin.js``, ``admin.css``) polls
``/admin/cluster.json`` every few seconds.

What each column costs: the peers' stats are the ones placement already polls
(``Node.peer_health``); their counters are one ``GET /internal/metrics`` per peer, and the
rule check one ``GET <public_url>/i<N>/healthz`` per instance, all at once and each bounded
by ``node.peer_timeout``. So a page refresh costs a few requests per instance, and a peer
that does not answer makes one row say so rather than the page hang.

The rule check goes through the load balancer (or the local router) the way a client does:
``ok`` when the answer comes from instance N itself, ``wrong instance`` when another node
answers (a rule pointing at the wrong target group), ``draining`` (503 from N), or
``unreachable`` with the reason.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from shardchat import urls
from shardchat.config import Config, ConfigError
from shardchat.internal_api import ADMIN_DATA_PATH, ADMIN_PATH, METRICS_PATH, auth_header

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSETS = {"admin.js": "text/javascript", "admin.css": "text/css"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class Inspected(Protocol):
    """What the page reads of its node (``node/main.py``'s ``Node``)."""

    number: int

    def stats(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...

    def peer_health(self) -> list[dict[str, Any]]: ...


def rule_url(cfg: Config, number: int) -> str:
    """Where a client reaches instance N's health check through its path rule: under its
    shard's public URL (SPEC section 10), as its rooms' URLs are."""
    return cfg.public_url_for(number).rstrip("/") + urls.healthz_path(number)


async def check_rule(session: aiohttp.ClientSession, url: str, number: int) -> dict[str, Any]:
    """Does ``url`` (instance N's rule) reach instance N? See the module docstring."""
    try:
        async with session.get(url, allow_redirects=False) as resp:
            body = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return {"status": "unreachable", "detail": f"{type(exc).__name__}: {exc}".rstrip(": ")}
    answered = body.get("instance") if isinstance(body, dict) else None
    if answered is None:  # the balancer's own answer (no target, target down), not a node's
        return {"status": "unreachable", "detail": f"HTTP {resp.status} from the balancer"}
    if answered != number:
        return {"status": "wrong instance",
                "detail": f"HTTP {resp.status} from instance {answered!r}, not {number}"}
    if resp.status == 503:
        return {"status": "draining", "detail": "instance answers 503 (shutting down)"}
    if resp.status != 200:
        return {"status": "unreachable", "detail": f"HTTP {resp.status}"}
    return {"status": "ok", "detail": f"routed to instance {number}"}


async def peer_metrics(session: aiohttp.ClientSession, base_url: str) -> dict[str, Any] | None:
    try:
        async with session.get(base_url + METRICS_PATH) as resp:
            if resp.status != 200:
                return None
            body = await resp.json()
            return body if isinstance(body, dict) else None
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return None


def _row(number: int, here: bool, address: str, seen: dict[str, Any],
         metrics: dict[str, Any] | None, follower: int | None,
         rule: dict[str, Any]) -> dict[str, Any]:
    """One instance's line on the page."""
    store = (metrics or {}).get("store", {})
    replica = (metrics or {}).get("replication")
    ship = (metrics or {}).get("online_replication", {}).get("shipping")
    reachable = bool(seen.get("healthy", here))
    known = seen if reachable else {}  # a down peer's last numbers would mislead
    return {"instance": number, "this": here, "address": address,
            "reachable": reachable, "error": seen.get("error"),
            "stats_age": seen.get("age"), "connections": known.get("connections"),
            "rooms": known.get("rooms"), "load": known.get("load"),
            "draining": bool(seen.get("draining")),
            "messages": store.get("messages"), "commits": store.get("commits"),
            "follower": follower,
            "follower_lag": None if ship is None else {
                "connected": ship["connected"], "records": ship["records_behind"],
                "seconds": ship["seconds_behind"]},
            "offsite": None if replica is None else {
                "running": replica.get("running"), "target": replica.get("target"),
                "last_upload_age": replica.get("last_upload_age")},
            "rule": rule}


async def cluster_view(cfg: Config, node: Inspected) -> dict[str, Any]:
    """Every instance's row (this node first asks its peers and the rules, all at once)."""
    peers = node.peer_health()
    own = node.stats()
    timeout = aiohttp.ClientTimeout(total=cfg.node.peer_timeout)
    async with aiohttp.ClientSession(timeout=timeout,
                                     headers=auth_header(cfg.cluster.secret)) as peer_session, \
            aiohttp.ClientSession(timeout=timeout) as public_session:
        numbers = sorted([node.number, *(p["instance"] for p in peers)])
        metric_calls = [peer_metrics(peer_session, f"http://{p['host']}:{p['internal_port']}")
                        for p in peers]
        rule_calls = [check_rule(public_session, rule_url(cfg, n), n) for n in numbers]
        results = await asyncio.gather(*metric_calls, *rule_calls)
    by_number = {p["instance"]: p for p in peers}
    peer_counters = dict(zip(by_number, results[:len(peers)], strict=True))
    rules = dict(zip(numbers, results[len(peers):], strict=True))
    inst = {i.number: i for i in cfg.instances}
    rows = []
    for n in numbers:
        if n == node.number:
            seen = {**own, "healthy": True, "age": 0.0}
            counters: dict[str, Any] | None = node.metrics()
            address = _address(inst.get(n))
        else:
            seen = by_number[n]
            counters = peer_counters[n]
            address = f"{seen['host']}:{seen['internal_port']}"
        rows.append(_row(n, n == node.number, address, seen, counters, _follower(cfg, n),
                         rules[n]))
    return {"cluster": cfg.cluster.name, "asked": node.number,
            "public_url": cfg.cluster.public_url, "at": time.time(), "instances": rows}


def _follower(cfg: Config, number: int) -> int | None:
    """Instance N's follower when on-line replication is on (SPEC section 9), else None."""
    if cfg.node.replication == "off":
        return None
    try:
        return cfg.follower_of(number)
    except ConfigError:  # an instance known by discovery alone
        return None


def _address(inst: Any) -> str:
    return f"{inst.host}:{inst.internal_port}" if inst is not None else "?"


def add_routes(app: web.Application, cfg: Config, node: Inspected) -> None:
    """The page, its two assets and its data, on the internal listener's app."""

    async def page(request: web.Request) -> web.StreamResponse:
        return _file("admin.html", "text/html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return _file(name, ASSETS[name])

    async def data(request: web.Request) -> web.Response:
        return web.json_response(await cluster_view(cfg, node),
                                 headers={"Cache-Control": "no-store"})

    app.router.add_get(ADMIN_PATH, page)
    app.router.add_get(ADMIN_DATA_PATH, data)
    app.router.add_get(ADMIN_PATH + "/{name}", asset)


def _file(name: str, content_type: str) -> web.StreamResponse:
    return web.FileResponse(WEB_DIR / name, headers={
        "Content-Type": f"{content_type}; charset=utf-8", "Cache-Control": "no-cache",
        "Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"})
