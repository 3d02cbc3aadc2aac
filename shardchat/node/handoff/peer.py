"""The handoff's calls to other nodes: secret-checked JSON over their internal listeners.

One aiohttp session per node, opened on first use. A peer that cannot be reached, is too
slow or answers garbage raises ``PeerDown`` (try again later); one that answers with an error
status raises ``PeerRefused`` with its status and error code (it read the request and said
no: retrying the same request will not help).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class PeerDown(Exception):
    """The peer did not answer (unreachable, timed out, or not JSON)."""

    def __init__(self, number: int, reason: str):
        super().__init__(f"instance {number}: {reason}")
        self.number = number
        self.reason = reason


class PeerRefused(Exception):
    """The peer answered with an error status: ``status``, ``code``, its whole ``body``."""

    def __init__(self, number: int, status: int, body: Any):
        self.body = body if isinstance(body, dict) else {}
        self.code = str(self.body.get("error") or "error")
        self.status = status
        self.number = number
        super().__init__(f"instance {number} answered {status} {self.code}: "
                         f"{self.body.get('message', '')}".rstrip(": "))


class Peers:
    """JSON calls to peers' internal listeners. ``locate(n)``: the base URL of instance n's
    internal listener (``http://host:port``), None when n is not a known instance."""

    def __init__(self, auth: dict[str, str], locate: Callable[[int], str | None]):
        self._auth = auth
        self._locate = locate
        self._session: aiohttp.ClientSession | None = None

    def known(self, number: int) -> bool:
        return self._locate(number) is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, number: int, method: str, path: str, body: Any = None, *,
                   timeout: float, ok: tuple[int, ...] = (200,)) -> Any:
        """The JSON answer of ``method path`` on instance ``number``; its status must be in
        ``ok``. Raises PeerDown or PeerRefused; never waits longer than ``timeout``."""
        base = self._locate(number)
        if base is None:
            raise PeerDown(number, "not a known instance")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._auth, cookie_jar=aiohttp.DummyCookieJar(),
                connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self._session.request(
                    method, base + path, json=body,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                try:
                    answer = await resp.json(content_type=None)
                except ValueError:
                    raise PeerDown(number, f"answered {resp.status} without JSON") from None
                if resp.status not in ok:
                    raise PeerRefused(number, resp.status, answer)
                return answer
        except TimeoutError:
            raise PeerDown(number, f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise PeerDown(number, f"unreachable ({exc.__class__.__name__})") from None
