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
