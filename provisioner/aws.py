"""boto3 clients with the retry behaviour every provisioner call relies on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

# botocore's adaptive mode retries throttled reads and writes with backoff and also slows
# the client down when AWS keeps throttling; apply.py adds its own retry on mutations on top.
RETRY_CONFIG = BotoConfig(retries={"mode": "adaptive", "max_attempts": 8},
                          connect_timeout=10, read_timeout=30)

DESCRIBE_TAGS_BATCH = 20  # AWS accepts at most 20 ARNs per DescribeTags call


@dataclass(frozen=True)
class Clients:
    elbv2: Any
    ec2: Any


def make_clients(region: str, endpoint_url: str | None = None,
                 session: boto3.session.Session | None = None) -> Clients:
    session = session or boto3.session.Session()
    kw: dict[str, Any] = {"region_name": region, "config": RETRY_CONFIG}
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return Clients(elbv2=session.client("elbv2", **kw), ec2=session.client("ec2", **kw))


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "")) or str(exc)


def tags_of(elbv2: Any, arns: list[str]) -> dict[str, dict[str, str]]:
    """Tags of many ELB resources, 20 ARNs per call."""
    out: dict[str, dict[str, str]] = {}
    for start in range(0, len(arns), DESCRIBE_TAGS_BATCH):
        batch = arns[start:start + DESCRIBE_TAGS_BATCH]
        resp = elbv2.describe_tags(ResourceArns=batch)
        for desc in resp.get("TagDescriptions", []):
            out[desc["ResourceArn"]] = {t["Key"]: t["Value"] for t in desc.get("Tags", [])}
    return out


def paginate(client: Any, operation: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for page in client.get_paginator(operation).paginate(**kwargs):
        items.extend(page.get(key, []))
    return items
