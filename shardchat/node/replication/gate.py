"""Sync replication's ack gate: a message is acked only once the follower has it on disk.

``Store.ack_gate`` is awaited after a message's commit (and for a duplicate: a resend must
not be acked before its first copy is safe either). The gate takes the owner's head
position at that moment, which covers the message's own commit (its batch was numbered
before its waiter woke), and waits until the follower acked it.

Bounded, never a hang: after ``node.replication_ack_timeout`` the message is refused with
``unavailable`` (``AckRefused``; it is stored on the owner, a resend is a duplicate). While
the follower has been away longer than that, the refusal is immediate, so a burst does not
queue behind the timeout. With ``node.replication_fallback = "async"`` the gate lets the
message through instead, logs the switch once and counts every such ack
(``fallback_acks``); it goes back to sync the moment the follower has caught up.
"""

from __future__ import annotations

import asyncio
import logging
import time

from shardchat.node.replication.stream import ShipLog
from shardchat.node.store.errors import AckRefused

log = logging.getLogger("shardchat.node.replication")


class AckGate:
    """``await gate()``: see the module docstring."""

    def __init__(self, ship: ShipLog, timeout: float, fallback: bool) -> None:
        self.ship = ship
        self.timeout = timeout
        self.fallback = fallback
        self.degraded = False  # acking as async until the follower catches up
        self.waited = 0
        self.refused = 0
        self.fallback_acks = 0
        ship.on_caught_up.append(self._caught_up)

    async def __call__(self) -> None:
        ship = self.ship
        target = ship.head
        if ship.acked >= target:
            return
        if self.degraded:
            self.fallback_acks += 1
            return
        away = not ship.connected and time.monotonic() - ship.changed_at > self.timeout
        if not away:
            self.waited += 1
            try:
                await asyncio.wait_for(asyncio.shield(ship.wait_ack(target)), self.timeout)
                return
            except TimeoutError:
                pass
        if self.fallback:
            self.degraded = True
            self.fallback_acks += 1
            log.warning("instance %d (the follower) did not confirm within %g s: acking "
                        "after the local commit only (node.replication_fallback = "
                        "\"async\") until it catches up", ship.follower, self.timeout)
            return
        self.refused += 1
        raise AckRefused(None, False, self.reason())

    def reason(self) -> str:
        return (f"Saved on this server, but its copy on instance {self.ship.follower} (this "
                f"room's follower) was not confirmed within {self.timeout:g} s. Send it "
                "again with the same client_id (it is never stored twice) once the follower "
                "is back; an operator can set node.replication_fallback = \"async\" to accept "
                "messages meanwhile.")

    def _caught_up(self) -> None:
        if self.degraded:
            self.degraded = False
            log.info("instance %d (the follower) caught up: acks are sync again",
                     self.ship.follower)

    def stats(self) -> dict[str, int | bool]:
        return {"waited": self.waited, "refused": self.refused,
                "fallback_acks": self.fallback_acks, "degraded": self.degraded}
