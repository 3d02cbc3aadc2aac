"""Header and idle timeouts of the node's listeners (public and internal).

A client that trickles its request headers is cut off after ``node.header_timeout``; a
long-polling GET or a WebSocket that stays open longer than that is not. The router's
listener has the same guard (tests/test_router.py).
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from shardchat import config as config_mod
from tests.support import SECRET, running_nodes

HEADER_TIMEOUT = 1.0
BOUND = HEADER_TIMEOUT + 1.5  # what a trickling client may hold a socket, with scheduling slack


async def trickle_headers(port: int, first: bytes, every: float, limit: float
                          ) -> tuple[float, bytes]:
    """Send ``first``, then one more header byte each ``every`` s, until the server closes
    the socket (or ``limit`` s pass); returns (seconds it stayed open, what it answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = b""
    try:
        writer.write(first)
        while loop.time() - started < limit:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                with contextlib.suppress(ConnectionError):
                    writer.write(b"X")
                    await writer.drain()
                continue
            except ConnectionError:
                break
            if not chunk:
                break
            answer += chunk
        return loop.time() - started, answer
    finally:
        writer.close()


@pytest.fixture(scope="module")
def slow_node(tmp_path_factory):
    """A node with a 1 s header timeout and 3 s between Engine.IO pings (so one long-poll
    outlasts the header timeout threefold)."""
    tmp = tmp_path_factory.mktemp("listener")
    node = {"header_timeout": HEADER_TIMEOUT, "ping_interval": 3.0, "ping_timeout": 2.0}
    with running_nodes(tmp, 1, node=node) as nodes:
        yield nodes[0]


@pytest.mark.parametrize("listener", ["public", "internal"])
async def test_trickled_headers_are_cut_off(slow_node, listener):
    port = slow_node.port if listener == "public" else slow_node.internal_port
    head = f"GET /i1/healthz HTTP/1.1\r\nAuthorization: Bearer {SECRET}\r\nX-Slow: ".encode()
    held, answer = await trickle_headers(port, head, 0.2, 15)
    assert held < BOUND, f"a trickling client held the {listener} socket {held:.1f} s"
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    silent, answer = await trickle_headers(port, b"", 30, 15)  # connects, sends nothing
    assert silent < BOUND and answer == b""


async def test_long_poll_and_websocket_outlast_the_header_timeout(slow_node):
    base = f"{slow_node.base_url}/i1/socket.io/?EIO=4"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}&transport=polling") as r:
            text = await r.text()
        assert r.status == 200 and text.startswith("0{"), text
        sid = text.split('"sid":"', 1)[1].split('"', 1)[0]
        started = loop.time()
        async with s.get(f"{base}&transport=polling&sid={sid}") as r:  # held until the ping
            assert r.status == 200 and await r.text() == "2"
        assert loop.time() - started > 2 * HEADER_TIMEOUT
        async with s.ws_connect(f"{base.replace('http', 'ws')}&transport=websocket") as ws:
            assert (await ws.receive(timeout=5)).data.startswith("0{")
            started = loop.time()
            assert (await ws.receive(timeout=10)).data == "2"  # still open: the ping came
            assert loop.time() - started > 2 * HEADER_TIMEOUT


def _cfg(node: dict, aws: dict | None = None) -> config_mod.Config:
    return config_mod.parse({"node": node, "aws": aws or {}}, env={})


def test_timeouts_are_config_keys_with_safe_defaults():
    cfg = _cfg({})
    assert cfg.node.header_timeout == 10.0
    assert cfg.keepalive_timeout == 75.0  # the ALB's 60 s idle timeout + 15 s
    assert _cfg({}, {"idle_timeout": 120}).keepalive_timeout == 135.0
    assert _cfg({"idle_timeout": 61.0}).keepalive_timeout == 61.0


@pytest.mark.parametrize("node, aws", [
    ({"header_timeout": 0}, None),
    ({"idle_timeout": -1.0}, None),
    ({"idle_timeout": 60.0}, None),  # not longer than the ALB's: it would race the ALB
    ({"idle_timeout": 90.0}, {"idle_timeout": 100}),
])
def test_bad_timeouts_name_their_key(node, aws):
    with pytest.raises(config_mod.ConfigError) as info:
        _cfg(node, aws)
    assert info.value.key == f"node.{next(iter(node))}"


def test_listeners_queue_a_crowd_of_connections(slow_node) -> None:
    """The listen queue holds ``LISTEN_BACKLOG`` (capped by the kernel's somaxconn), not
    aiohttp's 128: a crowd arriving at once must not have its SYNs dropped and retried a
    second later. ``ss`` shows a listening socket's queue size as its Send-Q."""
    import shutil
    import subprocess
    from pathlib import Path

    from shardchat.listener import LISTEN_BACKLOG

    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    cap = int(Path("/proc/sys/net/core/somaxconn").read_text())
    for port in (slow_node.port, slow_node.internal_port):
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        assert out, f"nothing listens on {port}"
        assert int(out[2]) == min(LISTEN_BACKLOG, cap), out
