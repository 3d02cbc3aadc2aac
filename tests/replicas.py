"""Helpers of the on-line replication tests: clusters with a follower per instance, the lag
in metrics, ``shardchat adopt``, and a TCP proxy a test can cut.

Cutting one link and only that one: every node reads the same config, except that a node
may get its own copy in which one peer's ``internal_port`` is a ``Proxy`` in front of the
real one. Stopping the proxy cuts exactly what that node says to that peer (the follower
stream, its stats polls), as a broken network path would; the others see nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shardchat.config import dump_toml
from tests.conftest import Refused, open_client
from tests.moves import Sender, room_state
from tests.support import (
    AUTH,
    ROOT,
    NodeProcess,
    async_wait_until,
    http_json,
    make_cluster_config,
    start_nodes,
    wait_until,
)


def metrics(node: NodeProcess) -> dict[str, Any]:
    status, body = http_json("GET", f"{node.internal_url}/internal/metrics", headers=AUTH,
                             timeout=5)
    assert status == 200, body
    return body["online_replication"]


def caught_up(owner: NodeProcess) -> bool:
    """The owner's follower acked everything the owner shipped."""
    ship = metrics(owner).get("shipping", {})
    return bool(ship) and ship["connected"] and ship["acked"] == ship["head"]


def wait_caught_up(owner: NodeProcess, timeout: float = 30.0) -> None:
    wait_until(lambda: caught_up(owner), timeout, what=f"instance {owner.number}'s follower "
               "to catch up")


def shardchat(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "shardchat", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def adopt(config: Path, number: int, *extra: str) -> subprocess.CompletedProcess:
    return shardchat("adopt", "--config", str(config), "--instance", str(number), *extra)


def wipe(node: NodeProcess, data_dir: Path) -> None:
    """The lost machine's disk: gone."""
    shutil.rmtree(data_dir / f"i{node.number}", ignore_errors=True)


def lookup(node: NodeProcess, room_id: str) -> tuple[int, Any]:
    return http_json("GET", f"{node.base_url}/api/rooms/{room_id}", timeout=10)


def config_with_proxy(config: Path, number: int, proxy_port: int, name: str) -> Path:
    """A copy of ``config`` in which instance ``number``'s internal port is ``proxy_port``."""
    return config_with_proxies(config, {number: proxy_port}, name)


def config_with_proxies(config: Path, ports: dict[int, int], name: str) -> Path:
    """A copy of ``config`` in which each instance of ``ports`` has that internal port."""
    data = tomllib.loads(config.read_text())
    for inst in data["instances"]:
        if inst["number"] in ports:
            inst["internal_port"] = ports[inst["number"]]
    out = config.with_name(name)
    out.write_text(dump_toml(data) + "\n")
    return out


class Proxy:
    """A TCP proxy on a loopback port in front of ``target``, in a thread of its own, that
    the test stops (every connection through it closed, new ones refused) and restarts."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def retarget(self, port: int) -> None:
        self.target_port = port

    def start(self) -> Proxy:
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


@contextlib.contextmanager
def cluster(tmp: Path, mode: str, n: int = 3, cut: tuple[int, int] | None = None,
            env: dict[int, dict[str, str]] | None = None,
            cuts: list[tuple[int, int]] | None = None, **node: Any
            ) -> Iterator[tuple[Path, list[NodeProcess], Any]]:
    """(config, nodes, proxy) of ``n`` nodes with ``node.replication = mode``: ``cut = (a,
    b)`` puts a ``Proxy`` between node ``a`` and instance ``b``'s internal listener (``a``
    gets a config of its own); ``cuts`` puts one on each link it lists, and the third item
    is then ``{(a, b): Proxy}``; ``env`` adds to a node's environment (a fault switch)."""
    settings = {"replication": mode, "replication_ack_timeout": 3.0,
                "rate_limit_messages": 100_000, **node}
    path, instances = make_cluster_config(tmp, n, node=settings)
    links = ([cut] if cut is not None else []) + list(cuts or [])
    proxies = {(a, b): Proxy(instances[b - 1]["internal_port"]).start() for a, b in links}

    def configs_through_proxies() -> dict[int, Path]:
        out = {i["number"]: path for i in instances}
        for a in sorted({a for a, _ in links}):
            ports = {b: p.port for (a_, b), p in proxies.items() if a_ == a}
            out[a] = config_with_proxies(path, ports, f"via-proxy-{a}.toml")
        return out

    configs = configs_through_proxies()
    nodes = [NodeProcess(configs[i["number"]], i, tmp, env=(env or {}).get(i["number"]))
             for i in instances]

    def through_the_proxy_again() -> None:
        """After fresh ports (a clash at start): each proxy goes to its instance's new
        port, and the configs of the nodes behind proxies name them again in place of it."""
        for (_a, b), p in proxies.items():
            p.retarget(instances[b - 1]["internal_port"])
        configs_through_proxies()

    try:
        start_nodes(nodes, repicked=through_the_proxy_again)
        yield path, nodes, (proxies[cut] if cut is not None else proxies or None)
    finally:
        for node_ in nodes:
            node_.stop()
        for p in proxies.values():
            p.close()


# A burst sends at most this many messages in all, so that a member rejoining with
# last_seq 0 (``check_adopted``) recovers every one of them in its welcome: fewer than
# node.max_recovery (1,000) and well within one page (node.max_page_bytes). On a fast
# machine an unbounded burst passed 1,000 while a test waited for a restart.
BURST_LIMIT = 600


async def burst(owner: NodeProcess, room: dict[str, Any], senders: int = 3,
                until_acked: int = 60) -> tuple[list[Sender], list[Any]]:
    """Members sending at once until ``until_acked`` messages are acked in all (each stops
    after its share of ``BURST_LIMIT``)."""
    assert until_acked <= BURST_LIMIT
    clients = [await open_client(owner, room, name=f"s{i}") for i in range(senders)]
    running = [Sender(c, prefix=f"s{i}", limit=BURST_LIMIT // senders).start()
               for i, c in enumerate(clients)]
    await async_wait_until(lambda: sum(len(s.acked) for s in running) >= until_acked,
                           timeout=60, what="a burst of acked messages")
    return running, clients


async def stop_all(running: list[Sender], clients: list[Any]) -> dict[str, int]:
    for s in running:
        await s.stop()
    for c in clients:
        with contextlib.suppress(Exception):
            await c.close()
    acked: dict[str, int] = {}
    for s in running:
        acked.update(s.acked)
    return acked


async def check_adopted(adopter: NodeProcess, room: dict[str, Any], acked: dict[str, int],
                        token: str) -> list[dict[str, Any]]:
    """Every acked message on the adopter once, seqs gap-free, dedup and seq go on."""
    member = await open_client(adopter, room["id"], name="s0", last_seq=0, token=token)
    try:
        welcome = member.welcome
        assert welcome["recovered"] is True, welcome
        history = welcome["history"]
        seqs = [m["seq"] for m in history]
        assert seqs == list(range(1, len(seqs) + 1)), f"seqs with a gap: {seqs}"
        held = {m["client_id"]: m["seq"] for m in history}
        missing = {cid: seq for cid, seq in acked.items() if held.get(cid) != seq}
        assert not missing, f"acked and lost: {missing}"
        mine = [cid for cid in acked if cid.startswith("s0-")]
        if mine:
            again = await member.send(mine[-1], client_id=mine[-1])
            assert again.get("ok") is True and again["seq"] == acked[mine[-1]], again
        fresh = await member.send_ok("after the adoption", client_id="after")
        assert fresh["seq"] == len(seqs) + 1, fresh
        return history
    finally:
        await member.close()


async def assert_fenced(node, room: dict, adopter: int, name: str = "m") -> Any:
    """``room`` is a forward on ``node`` to ``adopter`` (fenced there after an adoption),
    and a client joining it there is refused ``moved``; the refusal, for more checks."""
    status, state = await asyncio.to_thread(room_state, node, room["id"])
    assert status == 200 and state["state"] == "forwarded" and state["to"] == adopter, state
    try:
        await open_client(node, room, name=name)
    except Refused as refused:
        assert refused.code == "moved", refused
        return refused
    raise AssertionError(f"a client joined room {room['id']} on instance {node.number}")
