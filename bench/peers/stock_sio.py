"""Stock python-socketio on aiohttp + uvloop, doing what shardchat's room does on the wire.

Fairest equivalent of shardchat: one namespace per room (shardchat's namespaces are the
room paths), and a broadcast is ``sio.emit("message", msg, namespace=ns)``, the library's
own one-call broadcast. The message carries the same fields as shardchat's (seq, room,
from with sid, name and a 22-character member id, text, ts, client_id) so frames have the
same size. With ``--redis URL`` the server
uses python-socketio's AsyncRedisManager: the Redis-adapter design, where the members of
one room may sit on different nodes and every broadcast goes through Redis pub/sub.

Run: python -m bench.peers.stock_sio --port P [--redis redis://127.0.0.1:R/0]
"""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any

import socketio
from aiohttp import web


def build_app(redis_url: str | None = None) -> web.Application:
    """The aiohttp app with a Socket.IO server that accepts any namespace."""
    manager = socketio.AsyncRedisManager(redis_url) if redis_url else None
    sio = socketio.AsyncServer(async_mode="aiohttp", namespaces="*", client_manager=manager,
                               cors_allowed_origins="*", logger=False, engineio_logger=False)
    app = web.Application()
    sio.attach(app)
    names: dict[str, str] = {}
    members: dict[str, str] = {}
    seqs: dict[str, int] = {}

    @sio.on("connect", namespace="*")
    async def on_connect(namespace: str, sid: str, environ: dict, auth: Any = None) -> bool:
        names[sid] = str((auth or {}).get("name", "anon"))[:40]
        members[sid] = secrets.token_urlsafe(16)
        return True

    @sio.on("disconnect", namespace="*")
    async def on_disconnect(namespace: str, sid: str, reason: Any = None) -> None:
        names.pop(sid, None)
        members.pop(sid, None)

    @sio.on("message", namespace="*")
    async def on_message(namespace: str, sid: str, data: Any) -> dict:
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            return {"ok": False, "error": "bad_request", "message": "text is required"}
        seq = seqs.get(namespace, 0) + 1
        seqs[namespace] = seq
        ts = int(time.time() * 1000)
        msg = {"seq": seq, "room": namespace.rsplit("/", 1)[-1],
               "from": {"sid": sid, "name": names.get(sid, "anon"),
                        "member": members.get(sid, "")}, "text": data["text"],
               "ts": ts, "client_id": data.get("client_id")}
        await sio.emit("message", msg, namespace=namespace)
        return {"ok": True, "seq": seq, "ts": ts}

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", default=None, help="redis:// URL: use AsyncRedisManager")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(build_app(args.redis), host="127.0.0.1", port=args.port, print=None,
                access_log=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
