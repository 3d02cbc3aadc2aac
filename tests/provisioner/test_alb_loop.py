"""The loop closed: what ``shardchat-provision apply`` writes to the ALB is what routes.

Real nodes on loopback addresses, an ALB (moto server) built by the installed CLI with IP
targets, its rules read back with ``load_rules_from_alb`` and evaluated by the local router,
and real Socket.IO clients whose rooms live on instance 1 and instance 2.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import socketio

from shardchat import urls
from shardchat.cluster.alb_rules import load_rules_from_alb
from shardchat.cluster.router import Router, serve
from shardchat.config import load
from tests.support import (
    SECRET,
    NodeProcess,
    async_wait_until,
    bound_port,
    distinct_free_ports,
    free_port,
    http_json,
    in_thread,
    wait_until,
    write_config,
)

from .conftest import REGION, build_network, provision

# Each node on its own loopback address: moto keys a target group's registrations by target
# id alone, so two IP targets 127.0.0.1:A and 127.0.0.1:B would collapse into one in the
# lobby (AWS keys them by id and port and keeps both).
HOSTS = {1: "127.0.0.2", 2: "127.0.0.3"}


def write_cluster(tmp_path, aws: dict) -> tuple:
    ports = iter(distinct_free_ports(2 * len(HOSTS)))
    instances = [{"number": n, "host": host, "port": next(ports), "internal_port": next(ports)}
                 for n, host in HOSTS.items()]
    cluster = {"name": "loop", "public_url": "http://127.0.0.1:8080", "secret": SECRET,
               "data_dir": str(tmp_path / "data")}
    return write_config(tmp_path / "shardchat.toml", instances=instances, cluster=cluster,
                        aws=aws), instances


def wait_healthy(node: NodeProcess, host: str) -> None:
    def ok() -> bool:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"node {node.number} exited:\n{node.log()}")
        url = f"http://{host}:{node.port}{urls.healthz_path(node.number)}"
        return http_json("GET", url, timeout=2)[0] == 200
    wait_until(ok, timeout=30, what=f"node {node.number} healthy")


async def create_room(node: NodeProcess, name: str) -> dict:
    host = HOSTS[node.number]
    status, room = await asyncio.to_thread(
        http_json, "POST", f"http://{host}:{node.internal_port}/internal/rooms",
        {"name": name, "private": False}, {"Authorization": f"Bearer {SECRET}"})
    assert status == 201, room
    return room


async def join_and_send(base_url: str, room: dict) -> tuple[dict, dict]:
    """Connect through the router, wait for welcome, send one message; (welcome, ack)."""
    n, ns = room["instance"], room["namespace"]
    welcome: asyncio.Future = asyncio.get_running_loop().create_future()
    client = socketio.AsyncClient(reconnection=False)

    @client.on("welcome", namespace=ns)
    async def on_welcome(data):
        if not welcome.done():
            welcome.set_result(data)

    await client.connect(base_url, namespaces=[ns], socketio_path=urls.socketio_path(n),
                         auth={"name": f"user{n}"}, transports=["websocket"], wait_timeout=10)
    try:
        hello = await asyncio.wait_for(welcome, 10)
        ack = await client.call("message", {"text": f"hi {n}"}, namespace=ns, timeout=10)
        return hello, ack
    finally:
        await client.disconnect()


async def test_rules_applied_to_the_alb_route_socketio_to_the_right_node(moto_server, tmp_path):
    net = build_network(moto_server.client("ec2"), count=0)
    aws = {"region": REGION, "load_balancer": "loop-alb", "vpc_id": net.vpc,
           "subnets": net.subnets, "security_groups": [net.security_group],
           "target_type": "ip"}
    cfg_path, instances = write_cluster(tmp_path, aws)
    nodes = [NodeProcess(cfg_path, inst, tmp_path) for inst in instances]
    runner = None
    cli_router: subprocess.Popen | None = None
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            await asyncio.to_thread(wait_healthy, node, HOSTS[node.number])
        done = await asyncio.to_thread(provision, "apply", "--auto-approve", "--config",
                                       str(cfg_path), "--endpoint-url", moto_server.url)
        assert done.returncode == 0, done.stderr

        ruleset, endpoints = await asyncio.to_thread(
            load_rules_from_alb, "loop-alb", region=REGION, endpoint_url=moto_server.url,
            cfg=load(cfg_path))
        assert [(r.priority, r.path_pattern, r.instance) for r in ruleset.rules] == [
            (1, urls.path_pattern(1), 1), (2, urls.path_pattern(2), 2)]
        assert ruleset.default_instances == (1, 2)
        assert endpoints == {i["number"]: (i["host"], i["port"]) for i in instances}

        runner = await serve(Router(ruleset, endpoints), "127.0.0.1", 0)
        base = f"http://127.0.0.1:{bound_port(runner)}"
        for node in nodes:
            status, body = await asyncio.to_thread(
                http_json, "GET", base + urls.healthz_path(node.number))
            assert status == 200 and body["instance"] == node.number
            room = await create_room(node, f"room on {node.number}")
            assert room["instance"] == node.number
            hello, ack = await join_and_send(base, room)
            assert hello["room"]["id"] == room["id"]
            assert ack["ok"] is True and ack["seq"] == 1

        # the same loop through the command an operator runs: `shardchat router --rules-from-alb`
        cli_port = free_port()
        cli_router = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "shardchat", "router", "--config", str(cfg_path),
             "--port", str(cli_port), "--rules-from-alb", "loop-alb",
             "--endpoint-url", moto_server.url, "--region", REGION],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        cli_base = f"http://127.0.0.1:{cli_port}"
        for node in nodes:
            def reached(node=node) -> bool:
                if cli_router.poll() is not None:
                    raise RuntimeError(f"router exited: {cli_router.stderr.read()}")
                status, body = http_json("GET", cli_base + urls.healthz_path(node.number))
                return status == 200 and body["instance"] == node.number
            await async_wait_until(in_thread(reached), 20, 0.1, "router CLI routes /i<N>/")
            room = await create_room(node, f"second room on {node.number}")
            hello, ack = await join_and_send(cli_base, room)
            assert hello["room"]["id"] == room["id"] and ack["seq"] == 1
    finally:
        if cli_router is not None and cli_router.poll() is None:
            cli_router.send_signal(signal.SIGTERM)
            cli_router.wait(timeout=10)
        if runner is not None:
            await runner.cleanup()
        for node in nodes:
            await asyncio.to_thread(node.stop)
