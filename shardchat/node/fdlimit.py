"""The node's open-files limit: the soft limit is raised to the hard limit at start.

Every connected client is a file descriptor, and Linux starts a process with a soft limit
of 1,024 open files (a shell's ``ulimit -n``), so a node left at that limit refuses
everyone after about a thousand clients, whatever its memory. Any process may raise its
own soft limit up to its hard limit, so the node does that before it listens and logs both
figures; raising the hard limit is the operator's (``LimitNOFILE=`` in the systemd unit,
``docs/systemd/``), since only a privileged process can.

At the limit nothing breaks: uvloop (libuv) keeps one descriptor in reserve, and when an
accept fails for lack of descriptors it frees it, accepts and at once closes each waiting
connection, and takes the reserve back. Those clients see their connection closed and
retry; the node neither spins on the listening socket nor stops, and serves the next
client as soon as a descriptor is free (``tests/test_fdlimit.py``).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("shardchat.node")

RESERVE = 64  # descriptors a node needs besides its clients: listeners, store, peers, logs
NR_OPEN = "/proc/sys/fs/nr_open"  # the kernel's ceiling when the hard limit is "unlimited"


def _ceiling(hard: int) -> int:
    if hard != resource.RLIM_INFINITY:
        return hard
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_soft_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (as far as the kernel allows) and
    return (soft, hard) as they are afterwards. Never raises: a refusal is logged and the
    node runs with what it has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft,
                        target, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def log_limit(soft: int, hard: int) -> None:
    """One line at start: how many clients the descriptors allow."""
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("open files: soft limit %d, hard limit %s: room for about %d connections "
             "(raise the hard limit with LimitNOFILE= or ulimit -Hn for more)", soft, shown,
             max(0, soft - RESERVE))
