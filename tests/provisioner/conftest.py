"""Fixtures for the provisioner tests: fake AWS credentials, a moto network with running
EC2 instances, configs that point at it, and a recorder of every AWS call a client makes.

Nothing here can reach real AWS: credentials are fake and every client talks to moto.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.core.botocore_stubber import BotocoreStubber

from shardchat import config as config_mod
from tests.support import ROOT, free_port, http_json, wait_until, write_config

REGION = "us-east-1"
# An AMI from moto's built-in catalogue (the one its EC2 docs use). Looking one up with
# describe_images costs seconds per test, so it is named directly.
MOTO_AMI = "ami-12c6146b"


@pytest.fixture(autouse=True)
def fake_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SECURITY_TOKEN": "testing", "AWS_SESSION_TOKEN": "testing",
                       "AWS_DEFAULT_REGION": REGION,
                       "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-creds")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@dataclass
class Network:
    """A VPC with two subnets in two zones, a security group and running instances."""

    vpc: str
    subnets: list[str]
    security_group: str
    instances: list[str]
    ips: dict[str, str] = field(default_factory=dict)


def build_network(ec2: Any, count: int = 3) -> Network:
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{i}.0/24",
                                 AvailabilityZone=f"{REGION}{zone}")["Subnet"]["SubnetId"]
               for i, zone in ((1, "a"), (2, "b"))]
    sg = ec2.create_security_group(GroupName="shardchat-alb", Description="alb",
                                   VpcId=vpc)["GroupId"]
    net = Network(vpc, subnets, sg, [])
    if count:
        add_instances(ec2, net, count)
    return net


def add_instances(ec2: Any, net: Network, count: int, tags: list[dict] | None = None
                  ) -> list[str]:
    kw: dict[str, Any] = {"ImageId": MOTO_AMI, "MinCount": count, "MaxCount": count,
                          "SubnetId": net.subnets[0]}
    if tags:
        kw["TagSpecifications"] = [{"ResourceType": "instance", "Tags": tags}]
    made = ec2.run_instances(**kw)["Instances"]
    for inst in made:
        net.instances.append(inst["InstanceId"])
        net.ips[inst["InstanceId"]] = inst["PrivateIpAddress"]
    return [i["InstanceId"] for i in made]


def config_dict(net: Network, numbers: list[int], *, ports: dict[int, int] | None = None,
                name: str = "demo", aws: dict | None = None) -> dict[str, Any]:
    """A config dict for ``numbers``, instance N on the network's (N-1)th EC2 instance."""
    ports = ports or {}
    instances = [{"number": n, "host": f"10.20.1.{10 + n}", "port": ports.get(n, 9000 + n),
                  "internal_port": 9500 + n, "ec2_instance_id": net.instances[(n - 1) %
                                                                           len(net.instances)]}
                 for n in numbers]
    table = {"region": REGION, "load_balancer": f"{name}-alb", "vpc_id": net.vpc,
             "subnets": net.subnets, "security_groups": [net.security_group]}
    table.update(aws or {})
    return {"cluster": {"name": name, "secret": "s3cret"}, "instances": instances,
            "aws": table}


def make_config(net: Network, numbers: list[int], **kw: Any) -> config_mod.Config:
    return config_mod.parse(config_dict(net, numbers, **kw), env={})


class CallRecorder:
    """Every API operation a boto3 client sends, in order (botocore event hook)."""

    def __init__(self, client: Any):
        self.calls: list[str] = []
        client.meta.events.register("before-call.*.*", self._on_call)

    def _on_call(self, model: Any, **_: Any) -> None:
        self.calls.append(model.name)

    @property
    def mutating(self) -> list[str]:
        return [c for c in self.calls if not c.startswith("Describe")]

    def clear(self) -> None:
        self.calls.clear()


@pytest.fixture
def aws() -> Iterator[tuple[Any, Any, Network]]:
    """(elbv2, ec2, network) inside an in-process moto."""
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        elbv2 = boto3.client("elbv2", region_name=REGION)
        yield elbv2, ec2, build_network(ec2)


class MotoServer:
    """A ``moto_server`` subprocess on a free loopback port."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        exe = Path(sys.executable).parent / "moto_server"
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log_path.read_text()[-2000:]}")
            return http_json("GET", f"{self.url}/moto-api/data.json", timeout=2)[0] == 200
        wait_until(up, timeout=60, what="moto_server answering")
        return self

    def reset(self) -> None:
        """Forget every resource (the next test starts from an empty account)."""
        status, _ = http_json("POST", f"{self.url}/moto-api/reset", body={})
        assert status == 200

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.url)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def moto_server_module(tmp_path_factory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto_server.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto_server(moto_server_module: MotoServer) -> Iterator[MotoServer]:
    moto_server_module.reset()
    yield moto_server_module


PROVISION = Path(sys.executable).parent / "shardchat-provision"


def provision(*args: str, stdin: str | None = None, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    """Run the installed ``shardchat-provision`` CLI on this checkout's code (the install
    may point at another checkout); returns the finished process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([str(PROVISION), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


def write_provision_config(path: Path, net: Network, numbers: list[int], **kw: Any) -> Path:
    data = config_dict(net, numbers, **kw)
    return write_config(path, instances=data["instances"], cluster=data["cluster"],
                        aws=data["aws"])


@pytest.fixture
def one_call_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each in-process moto call made one step, as each AWS call is atomic on AWS: moto
    runs calls from several threads interleaved inside its Python code (a describe can walk
    a tag dict another thread's create_tags is changing). Only whole calls are serialised;
    how the calls of racing threads interleave stays as free as on AWS."""
    guard = threading.Lock()
    original = BotocoreStubber.__call__

    def one_at_a_time(self: BotocoreStubber, *args: Any, **kwargs: Any) -> Any:
        with guard:
            return original(self, *args, **kwargs)
    monkeypatch.setattr(BotocoreStubber, "__call__", one_at_a_time)
