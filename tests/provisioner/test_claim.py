"""Instance numbers claimed at boot (``shardchat node --auto``): IMDSv2, the claim through
EC2 tags, and two real nodes booting at the same moment.

The claim relies on each EC2 API call being atomic, as it is on AWS. In-process moto runs
calls from several threads interleaved inside its Python code (a describe can walk a tag
dict another thread's create_tags is changing), so ``one_call_at_a_time`` (conftest.py)
makes each call one step, for this module's in-process tests only. The claim protocol
itself gets no help: the interleaving of whole calls (read, write, wait, read) is as free
as on AWS.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from shardchat.aws import imds
from shardchat.aws.claim import ClaimError, claim_number, claims
from shardchat.aws.ec2 import discover_instances
from shardchat.aws.tags import TAG_CLUSTER, TAG_INSTANCE_NUMBER
from tests.support import (
    ROOT,
    SECRET,
    GiveUp,
    distinct_free_ports,
    http_json,
    wait_until,
    write_config,
)

from .conftest import REGION, add_instances, build_network, make_config

CLUSTER = [{"Key": TAG_CLUSTER, "Value": "demo"}]


@pytest.fixture
def ec2(one_call_at_a_time) -> Iterator[tuple[Any, Any]]:
    with mock_aws():
        client = boto3.client("ec2", region_name=REGION)
        yield client, build_network(client, count=0)


def claim(client: Any, me: str, settle: float = 0.05) -> int:
    return claim_number(client, "demo", me, settle=settle)


def test_many_instances_booting_at_once_never_share_a_number(ec2):
    client, net = ec2
    ids = add_instances(client, net, 12, CLUSTER)
    # every call of moto is serialised (see above), so 12 threads queue for it: a claimant's
    # read-to-write can take a second here, and the settle wait must outlast it
    start = threading.Barrier(len(ids))
    got: dict[str, int] = {}
    errors: list[BaseException] = []

    def boot(me: str) -> None:
        start.wait(timeout=30)
        try:
            got[me] = claim_number(boto3.client("ec2", region_name=REGION), "demo", me,
                                   settle=3.0)
        except BaseException as exc:  # reported below, with the numbers
            errors.append(exc)
    threads = [threading.Thread(target=boot, args=(me,)) for me in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(got.values()) == list(range(1, 13)), got
    assert claims(client, "demo") == got  # what every tag says now
    cfg = make_config(net, [], aws={"discover": "ec2-tags"})
    assert [i.number for i in discover_instances(cfg)] == list(range(1, 13))


def test_a_tie_goes_to_the_lowest_instance_id(ec2):
    client, net = ec2
    low, high = sorted(add_instances(client, net, 2, CLUSTER), key=lambda i: (len(i), i))
    for me in (low, high):  # both wrote 1 before either read again
        client.create_tags(Resources=[me], Tags=[{"Key": TAG_INSTANCE_NUMBER, "Value": "1"}])
    # meanwhile discovery (the provisioner, the peers) already gives 1 to the winner
    found = discover_instances(make_config(net, [], aws={"discover": "ec2-tags"}))
    assert [(i.number, i.ec2_instance_id) for i in found] == [(1, low)]
    assert claim(client, high) == 2
    assert claim(client, low) == 1


def test_stopped_instances_keep_their_number_terminated_ones_free_it(ec2):
    client, net = ec2
    one, two = add_instances(client, net, 2, CLUSTER)
    assert (claim(client, one), claim(client, two)) == (1, 2)
    assert claim(client, one) == 1  # a reboot keeps its number
    client.stop_instances(InstanceIds=[one])
    late = add_instances(client, net, 1, CLUSTER)[0]
    assert claim(client, late) == 3
    client.terminate_instances(InstanceIds=[one])
    newest = add_instances(client, net, 1, CLUSTER)[0]
    assert claim(client, newest) == 1


def claim_statement() -> dict[str, Any]:
    """The ``ShardchatClaimNumber`` IAM statement as docs/aws.md prints it."""
    text = (ROOT / "docs" / "aws.md").read_text()
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        if '"ShardchatClaimNumber"' in block:
            return json.loads(block)
    raise AssertionError("docs/aws.md has no ShardchatClaimNumber statement")


def test_a_claim_writes_only_what_the_documented_iam_statement_allows(ec2):
    """On AWS the statement is all a node's role may tag with: every CreateTags of a claim
    must pass its conditions, or every node of the fleet fails at boot."""
    client, net = ec2
    me = add_instances(client, net, 1, CLUSTER)[0]
    written: list[dict[str, Any]] = []
    client.meta.events.register("before-parameter-build.ec2.CreateTags",
                                lambda params, **_: written.append(dict(params)))
    assert claim(client, me) == 1
    statement = claim_statement()
    assert statement["Action"] == "ec2:CreateTags"
    allowed = set(statement["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    resource_tags = statement["Condition"]["StringEquals"]
    assert written, "the claim wrote no tag"
    for call in written:
        assert call["Resources"] == [me]  # only itself
        assert {t["Key"] for t in call["Tags"]} <= allowed, call
    # the condition on the instance's own tags is one the claimant meets before it writes
    assert list(resource_tags) == [f"ec2:ResourceTag/{TAG_CLUSTER}"]


def test_an_instance_without_the_cluster_tag_is_refused_before_it_writes(ec2):
    client, net = ec2
    stray = add_instances(client, net, 1, [{"Key": TAG_CLUSTER, "Value": "other"}])[0]
    bare = add_instances(client, net, 1)[0]
    for me, says in ((stray, "shardchat:cluster = 'other'"), (bare, "no such tag")):
        with pytest.raises(ClaimError, match="PropagateAtLaunch") as err:
            claim(client, me)
        assert says in str(err.value) and me in str(err.value)
    assert claims(client, "demo") == {} and claims(client, "other") == {}


# -- the metadata service ----------------------------------------------------------------


class FakeImds(http.server.ThreadingHTTPServer):
    """IMDSv2 on loopback: a token from PUT /latest/api/token, then metadata reads that
    carry it; a read without the token gets 401, as on EC2 with HttpTokens = required."""

    def __init__(self, instance_id: str, private_ip: str):
        self.meta = {"instance-id": instance_id, "local-ipv4": private_ip}
        self.token = os.urandom(8).hex()
        super().__init__(("127.0.0.1", 0), ImdsHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class ImdsHandler(http.server.BaseHTTPRequestHandler):
    server: FakeImds

    def _answer(self, status: int, body: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_PUT(self) -> None:
        ok = self.path == "/latest/api/token" and self.headers.get(
            "X-aws-ec2-metadata-token-ttl-seconds", "").isdigit()
        self._answer(200 if ok else 400, self.server.token if ok else "")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.server.token:
            self._answer(401, "")
            return
        key = self.path.removeprefix("/latest/meta-data/")
        value = self.server.meta.get(key)
        self._answer(200 if value else 404, value or "")

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def fake_imds() -> Iterator[FakeImds]:
    server = FakeImds("i-0123456789abcdef0", "10.1.2.3")
    yield server
    server.stop()


def test_imdsv2_identity_uses_a_session_token(fake_imds, monkeypatch):
    monkeypatch.setenv(imds.IMDS_URL_ENV, fake_imds.url)
    assert imds.identity() == imds.Identity("i-0123456789abcdef0", "10.1.2.3")
    status, _ = http_json("GET", f"{fake_imds.url}/latest/meta-data/instance-id")
    assert status == 401  # the stand-in refuses IMDSv1, so the token was really used


def test_no_metadata_service_is_a_sentence_not_a_hang():
    with pytest.raises(imds.ImdsError, match="IMDSv2"):
        imds.identity("http://127.0.0.1:9")


# -- two real nodes booting at the same moment --------------------------------------------


def test_two_nodes_booting_at_once_claim_1_and_2_and_serve(moto_server, tmp_path):
    client = moto_server.client("ec2")
    net = build_network(client, count=0)
    ids = add_instances(client, net, 2, CLUSTER)
    port, internal = distinct_free_ports(2)
    path = write_config(tmp_path / "shardchat.toml", instances=[],
                        cluster={"name": "demo", "secret": SECRET,
                                 "data_dir": str(tmp_path / "data")},
                        aws={"region": REGION, "discover": "ec2-tags", "claim_settle": 0.5,
                             "instance_port": port, "instance_internal_port": internal})
    hosts = {ids[0]: "127.0.0.2", ids[1]: "127.0.0.3"}
    fakes = [FakeImds(me, host) for me, host in hosts.items()]
    procs = []
    try:
        for fake in fakes:
            env = {**os.environ, imds.IMDS_URL_ENV: fake.url, "PYTHONPATH": str(ROOT)}
            with open(tmp_path / f"{fake.meta['instance-id']}.log", "ab") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "shardchat", "node", "--auto", "--config", str(path),
                     "--endpoint-url", moto_server.url], cwd=str(ROOT), env=env, stdout=log,
                    stderr=subprocess.STDOUT))

        def serving(host: str) -> int:
            if any(proc.poll() is not None for proc in procs):
                raise GiveUp("a node exited: " + " | ".join(
                    p.read_text()[-2000:] for p in tmp_path.glob("i-*.log")))
            status, body = http_json("GET", f"http://{host}:{port}/healthz", timeout=1)
            return body["instance"] if status == 200 else 0
        numbers = {me: wait_until(lambda h=host: serving(h), timeout=60, what=f"node at {host}")
                   for me, host in hosts.items()}
        assert sorted(numbers.values()) == [1, 2], numbers
        for me, host in hosts.items():
            n = numbers[me]
            status, body = http_json("GET", f"http://{host}:{port}/i{n}/healthz")
            assert status == 200 and body["instance"] == n
        assert claims(client, "demo") == numbers
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        for fake in fakes:
            fake.stop()


# -- what `node --auto` refuses ------------------------------------------------------------


def node_cmd(path, *args: str, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardchat", "node", "--config", str(path),
                           *args], cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT),
                                                      **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def auto_config(tmp_path, **aws: Any):
    return write_config(tmp_path / "shardchat.toml", instances=[],
                        cluster={"name": "demo", "secret": SECRET,
                                 "data_dir": str(tmp_path / "data")},
                        aws={"region": REGION, "discover": "ec2-tags", **aws})


def auto_node(moto_server, tmp_path, me: str, *, claim_settle: float
              ) -> subprocess.CompletedProcess:
    """``shardchat node --auto`` run to its end as EC2 instance ``me`` (IMDS on loopback)."""
    fake = FakeImds(me, "127.0.0.2")
    try:
        return node_cmd(auto_config(tmp_path, claim_settle=claim_settle), "--auto",
                        "--endpoint-url", moto_server.url, env={imds.IMDS_URL_ENV: fake.url})
    finally:
        fake.stop()


def test_node_wants_exactly_one_of_instance_and_auto(tmp_path):
    path = auto_config(tmp_path)
    for args in ((), ("--auto", "--instance", "1")):
        done = node_cmd(path, *args)
        assert done.returncode == 2, done.stderr
        assert "give either --instance N or --auto" in done.stderr


def test_auto_off_ec2_exits_1_with_a_sentence_not_a_hang(tmp_path):
    done = node_cmd(auto_config(tmp_path), "--auto", env={imds.IMDS_URL_ENV: "http://127.0.0.1:9"})
    assert done.returncode == 1, done.stderr
    assert "node --auto: no instance number claimed" in done.stderr and "IMDSv2" in done.stderr


def test_auto_on_an_instance_without_the_cluster_tag_exits_1_naming_the_tag(moto_server,
                                                                            tmp_path):
    client = moto_server.client("ec2")
    net = build_network(client, count=0)
    me = add_instances(client, net, 1)[0]
    done = auto_node(moto_server, tmp_path, me, claim_settle=0.1)
    assert done.returncode == 1, done.stderr
    assert f"EC2 instance {me} has no such tag: tag it {TAG_CLUSTER} = demo" in done.stderr
    assert claims(client, "demo") == {}


def test_auto_refuses_the_100th_number_without_a_shard_table(moto_server, tmp_path):
    """Instance 100 belongs to shard 2: without [[aws.shards]] tables no ALB would route it,
    so its node must not serve (placement would give it rooms nobody can reach)."""
    client = moto_server.client("ec2")
    net = build_network(client, count=0)
    held = add_instances(client, net, 99, CLUSTER)
    for n, iid in enumerate(held, start=1):
        client.create_tags(Resources=[iid], Tags=[{"Key": TAG_INSTANCE_NUMBER,
                                                   "Value": str(n)}])
    me = add_instances(client, net, 1, CLUSTER)[0]
    done = auto_node(moto_server, tmp_path, me, claim_settle=2.0)
    assert done.returncode == 2, done.stderr
    assert "Config error at aws.shards: instance 100" in done.stderr
    assert claims(client, "demo")[me] == 100  # kept: it starts once the tables exist
