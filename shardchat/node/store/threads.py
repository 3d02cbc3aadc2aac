"""Names the store's threads as the operating system shows them.

The writer, the checkpointer and the reader each burn CPU of their own; with a name that
``top -H``, py-spy and ``/proc`` show, a profile tells them from the event loop. Called by
each thread on itself as it starts.
"""

from __future__ import annotations

import contextlib


def name_os_thread(name: bytes) -> None:
    """Give the calling thread ``name`` (15 bytes at most) at the OS level; Linux only,
    silently nothing elsewhere."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
