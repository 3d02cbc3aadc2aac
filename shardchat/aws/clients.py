"""The one factory of boto3 clients, and the two helpers every caller of one needs.

Every AWS call shardchat makes (provisioner, router ``--rules-from-alb``, EC2-tag discovery
in the nodes) goes through a client made here, so all of them ride out throttling the same
way instead of each falling back to botocore's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

# botocore's adaptive mode retries throttled reads and writes with backoff and also slows
# the client down while AWS keeps throttling; provisioner/apply.py adds its own, more
# patient retry on mutations on top.
MAX_ATTEMPTS = 8  # retries after the first try (botocore: total_max_attempts = 9)
RETRY_CONFIG = BotoConfig(retries={"mode": "adaptive", "max_attempts": MAX_ATTEMPTS},
                          connect_timeout=10, read_timeout=30)


@dataclass(frozen=True)
class Clients:
    elbv2: Any
    ec2: Any
    dynamodb: Any  # the provisioner's state lock (provisioner/lock.py)


def client(service: str, region: str, endpoint_url: str | None = None, *,
           session: boto3.session.Session | None = None) -> Any:
    """A boto3 client of ``service`` with shardchat's retry policy; ``endpoint_url`` points
    it at a moto server or LocalStack instead of AWS."""
    session = session or boto3.session.Session()
    kw: dict[str, Any] = {"region_name": region, "config": RETRY_CONFIG}
    if endpoint_url:
        kw["endpoint_url"] = endpoint_url
    return session.client(service, **kw)


def make_clients(region: str, endpoint_url: str | None = None,
                 session: boto3.session.Session | None = None) -> Clients:
    """The ELBv2, EC2 and DynamoDB clients of one region, made from one session."""
    session = session or boto3.session.Session()
    return Clients(elbv2=client("elbv2", region, endpoint_url, session=session),
                   ec2=client("ec2", region, endpoint_url, session=session),
                   dynamodb=client("dynamodb", region, endpoint_url, session=session))


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "")) or str(exc)


def paginate(client: Any, operation: str, key: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every item under ``key`` of every page of ``operation``."""
    items: list[dict[str, Any]] = []
    for page in client.get_paginator(operation).paginate(**kwargs):
        items.extend(page.get(key, []))
    return items
