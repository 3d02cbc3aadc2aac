"""The one error every store operation raises when it cannot do what was asked.

Its own module because every thread of the store raises it (the writer when a commit fails,
the readers when a read fails, the opening when the directory is unusable) and the facade
re-exports it; ``StoreDamaged``, the refusal of a damaged file at open, lives with the
integrity check in ``integrity.py``.
"""

from __future__ import annotations


class StoreError(Exception):
    """The store cannot do what was asked: it is closed, or a commit failed.

    The caller should tell the user to try again; nothing of the failed write was kept.
    """
