"""Which client a request comes from, for the per-address rate limits.

Behind a load balancer every connection's peer is the balancer, so the client's address has
to come from ``X-Forwarded-For``; but anybody can send that header, so it is believed only
from the proxies listed in ``node.trusted_proxies``. Each trusted proxy appends the address
it saw, so the header is read from the right: the first address that is not a trusted proxy
is the client (everything left of it was written by the client itself and proves nothing).

The result is a *key*, not a display value: IPv4-mapped IPv6 addresses count as their IPv4
address, and an IPv6 address counts as its /64 network, because one host is commonly handed
a whole /64 and could otherwise take a fresh address, and a fresh bucket, per request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPV6_CLIENT_PREFIX = 64
UNKNOWN = "unknown"  # a peer without an IP address (a Unix socket): one shared key


def parse_ip(text: str) -> IPAddress | None:
    """An address from a header or a socket (``1.2.3.4``, ``[::1]``, ``1.2.3.4:80``), or None."""
    value = text.strip()
    if value.startswith("["):  # [v6] or [v6]:port
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_key(ip: IPAddress) -> str:
    """The rate-limit key of one client address (an IPv6 address counts as its /64)."""
    if isinstance(ip, ipaddress.IPv6Address):
        net = ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False)
        return str(net)
    return str(ip)


class ClientAddresses:
    """Resolves the client address of an HTTP request or a Socket.IO environ."""

    def __init__(self, trusted_proxies: Iterable[str]):
        self.trusted = tuple(ipaddress.ip_network(t.strip()) for t in trusted_proxies)

    def is_trusted(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.trusted)

    def resolve(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client key, from the connection's peer and its ``X-Forwarded-For`` (all its
        values joined with commas)."""
        ip = parse_ip(peer) if peer else None
        if ip is None:
            return UNKNOWN
        if not forwarded_for or not self.is_trusted(ip):
            return address_key(ip)
        for hop in reversed(forwarded_for.split(",")):
            hop_ip = parse_ip(hop)
            if hop_ip is None:
                break  # garbage a trusted proxy passed on: the last good hop is the client
            ip = hop_ip
            if not self.is_trusted(ip):
                break
        return address_key(ip)

    def of_request(self, request: Any) -> str:
        """An aiohttp request's client."""
        xff = ",".join(request.headers.getall("X-Forwarded-For", ()))
        return self.resolve(request.remote, xff)

    def of_environ(self, environ: dict) -> str:
        """A Socket.IO session's client, from the environ its connect handler gets.

        engineio's environ holds a placeholder ``REMOTE_ADDR``; the real peer is the
        aiohttp request's (while the environ still holds it) or the ``REMOTE_ADDR`` the
        fast engine put there when it trimmed the environ of an open websocket."""
        request = environ.get("aiohttp.request")
        peer = request.remote if request is not None else environ.get("REMOTE_ADDR")
        return self.resolve(peer, environ.get("HTTP_X_FORWARDED_FOR"))
