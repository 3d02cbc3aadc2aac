"""The EC2 instance metadata service (IMDSv2): who am I, and at which address.

IMDSv2 only: a session token is fetched with a PUT first and sent with every read, which is
what instances launched with ``HttpTokens = required`` accept (and what keeps a server-side
request forgery from reading metadata through a plain GET). The base URL can be pointed
elsewhere with SHARDCHAT_IMDS_URL: at a stand-in on loopback in tests, or at an IPv6
endpoint (``http://[fd00:ec2::254]``).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass

IMDS_URL_ENV = "SHARDCHAT_IMDS_URL"
DEFAULT_URL = "http://169.254.169.254"
TOKEN_TTL = 300  # seconds the session token lives; a boot needs a few
TIMEOUT = 2.0  # seconds per request: IMDS answers in milliseconds or not at all


class ImdsError(RuntimeError):
    """The metadata service did not answer (not on EC2, or IMDS disabled or blocked)."""


@dataclass(frozen=True)
class Identity:
    instance_id: str
    private_ip: str


def base_url(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return (env.get(IMDS_URL_ENV) or DEFAULT_URL).rstrip("/")


def _request(req: urllib.request.Request, what: str) -> str:
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.read().decode().strip()
    except (urllib.error.URLError, OSError) as exc:
        raise ImdsError(f"the instance metadata service at {req.full_url} did not answer "
                        f"{what} ({exc}): run on EC2 with IMDSv2 enabled (or set "
                        f"{IMDS_URL_ENV})") from None


def identity(url: str | None = None) -> Identity:
    """This instance's id and private IPv4 address, read with one IMDSv2 token."""
    base = url or base_url()
    token = _request(urllib.request.Request(
        f"{base}/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)}), "a token request")
    auth = {"X-aws-ec2-metadata-token": token}

    def get(path: str) -> str:
        return _request(urllib.request.Request(f"{base}/latest/meta-data/{path}",
                                               headers=auth), path)
    return Identity(instance_id=get("instance-id"), private_ip=get("local-ipv4"))
