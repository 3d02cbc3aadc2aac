"""``shardchat adopt``: ask the follower of a lost instance to take over its rooms.

The work is the follower's (``node/replication/adopt.py``): this only finds it in the
config (``Config.follower_of``) and calls ``POST /internal/replication/adopt`` on its
internal listener, with the cluster secret. The follower refuses (409) when the instance
still answers, so a typo cannot take rooms from a healthy node.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from shardchat.cli_common import EXIT_FAILED, EXIT_OK, EXIT_REFUSED
from shardchat.config import Config
from shardchat.internal_api import ADOPT_PATH, auth_header

ADOPT_TIMEOUT = 120.0  # seconds: the copy of every room is written in one transaction


async def adopt(cfg: Config, number: int, force: bool = False) -> tuple[int, dict[str, Any]]:
    """(exit code, the follower's answer or the error) for adopting instance ``number``."""
    follower = cfg.follower_of(number)
    if follower is None:
        return EXIT_REFUSED, {"error": "no_follower", "message": f"Instance {number} has "
                              "no follower: the cluster has one instance."}
    inst = cfg.instance(follower)
    url = f"http://{inst.host}:{inst.internal_port}{ADOPT_PATH}"
    try:
        async with aiohttp.ClientSession(headers=auth_header(cfg.cluster.secret)) as s, \
                s.post(url, json={"instance": number, "force": force},
                       timeout=aiohttp.ClientTimeout(total=ADOPT_TIMEOUT)) as resp:
            body = await resp.json(content_type=None)
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        return EXIT_FAILED, {"error": "unreachable", "message": f"Instance {follower} (the "
                             f"follower of {number}) could not be asked: {exc}"}
    if status == 200:
        return EXIT_OK, body
    return (EXIT_REFUSED if status == 409 else EXIT_FAILED), body
