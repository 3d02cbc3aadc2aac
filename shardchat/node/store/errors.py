"""The one error every store operation raises when it cannot do what was asked.

Its own module because every thread of the store raises it (the writer when a commit fails,
the readers when a read fails, the opening when the directory is unusable) and the facade
re-exports it; ``StoreDamaged``, the refusal of a damaged file at open, lives with the
integrity check in ``integrity.py``. ``MoveConflict`` is the answer of a move's write
that the state of the store does not allow (``moves.py``).
"""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked: it is closed, or a commit failed.

    The caller should tell the user to try again; nothing of the failed write was kept.
    """


class MoveConflict(Exception):
    """The store's state does not allow this step of a move; nothing of it was written.

    ``code``: ``owned`` (the room is an active room here), ``not_owner`` (it is not),
    ``not_incoming`` (no incoming copy of the room under this move), ``incomplete`` (the
    copy lacks messages up to the source's last seq), ``bad_page`` (copied messages out of
    order, or not of this room)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class AckRefused(StoreError):
    """A message is committed here, but the ack gate (``Store.ack_gate``: sync replication,
    ``node/replication/gate.py``) could not confirm its copy elsewhere in time. ``message``
    is the record as stored (a resend with its ``client_id`` is a duplicate of it),
    ``duplicate`` whether it was stored before this call, ``reason`` a sentence for the
    person who sent it."""

    def __init__(self, message: object, duplicate: bool, reason: str):
        super().__init__(reason)
        self.message = message
        self.duplicate = duplicate
        self.reason = reason
