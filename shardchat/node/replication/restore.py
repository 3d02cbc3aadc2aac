"""``shardchat restore``: instance N's store rebuilt from its Litestream replica.

For a new machine (or a wiped disk): the instance's data directory must not hold a store
already, since restoring over one would throw away whatever it has that the replica lacks
(``--force`` moves the old files aside into ``replaced-<time>/`` in the same directory,
never deletes them). The directory lock is held throughout, so a node cannot start on the
directory while it is being restored, nor can a restore run under a running node.

Litestream writes the newest state it has into ``store.sqlite3.restoring``; that file must
pass the store's own check at open (``integrity.check``: ``PRAGMA quick_check``) and read
as a store (rooms, counters, moves) before it is renamed into place and the directory is
marked as holding a store. A failed restore leaves the directory as it found it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardchat.config import Config
from shardchat.node.replication import litestream
from shardchat.node.store import DB_NAME, MARKER_NAME, StoreDamaged, StoreError, integrity, schema
from shardchat.node.store.lock import DirectoryLock

RESTORE_TIMEOUT = 3600.0  # seconds one ``litestream restore`` may take (default of --timeout)
CONFIG_NAME = "litestream-restore.yml"  # beside the node's, with quieter logging
PARTIAL_SUFFIX = ".restoring"
ERROR_LINES = 8  # lines of Litestream's output quoted when it fails


class RestoreRefused(Exception):
    """Nothing was changed: the directory holds a store, or a process uses it."""


class RestoreFailed(Exception):
    """Litestream failed, or what it restored is not a sound store (nothing put in place)."""


class NothingToRestore(Exception):
    """The replica holds no backup of this instance."""


@dataclass(frozen=True)
class RoomSummary:
    room_id: str
    name: str
    messages: int
    last_seq: int


@dataclass
class Restored:
    """What ``restore`` put in place, for the command to print."""

    number: int
    source: str
    path: Path
    seconds: float
    size: int
    txid: str
    rooms: list[RoomSummary] = field(default_factory=list)
    arriving: int = 0  # rooms that were arriving by a move (finished when the node starts)
    forwards: int = 0  # rooms that had moved away (their redirects)
    replaced: Path | None = None  # where --force moved the old files

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.rooms)


def store_files(directory: Path) -> list[Path]:
    """The files of a store in ``directory`` that a restore would replace (the database,
    its WAL and shared memory, the marker, Litestream's local state)."""
    names = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", MARKER_NAME, litestream.META_NAME)
    return [directory / n for n in names if (directory / n).exists()]


def holds_store(directory: Path) -> bool:
    """A store was created here: the marker, a database with content, or a WAL."""
    db = directory / DB_NAME
    if (directory / MARKER_NAME).exists() or (directory / f"{DB_NAME}-wal").exists():
        return True
    return db.exists() and db.stat().st_size > 0


def restore(cfg: Config, number: int, *, force: bool = False,
            timeout: float = RESTORE_TIMEOUT) -> Restored:
    """Rebuild instance ``number``'s store from its replica; see the module docstring."""
    directory = cfg.instance_data_dir(number)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreFailed(f"cannot create {directory}: {exc}") from exc
    binary = litestream.find_binary()
    litestream.check_version(binary)
    lock = DirectoryLock(directory)
    try:
        lock.acquire()
    except StoreError as exc:
        raise RestoreRefused(f"{exc} A store cannot be restored under a running node: "
                             f"stop instance {number} first.") from None
    try:
        replaced = _clear(directory, number, force)
        started = time.monotonic()
        restored = _fetch(cfg, number, binary, directory, timeout)
        restored.replaced = replaced
        restored.seconds = time.monotonic() - started
        return restored
    finally:
        lock.release()


def _clear(directory: Path, number: int, force: bool) -> Path | None:
    """Refuse a directory holding a store (or, with ``force``, move its files aside);
    drop Litestream's local state of an earlier store either way."""
    meta = directory / litestream.META_NAME
    if holds_store(directory):
        files = store_files(directory)
        if not force:
            listed = ", ".join(p.name for p in files)
            raise RestoreRefused(
                f"{directory} already holds a store of instance {number} ({listed}); "
                "restoring would replace it and lose whatever it has that the replica "
                f"lacks. Start the node on it, move it away, or pass --force to move it "
                f"aside into {directory}/replaced-<time>/.")
        aside = directory / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
        aside.mkdir()
        for path in files:
            path.rename(aside / path.name)
        return aside
    if meta.exists():  # state of a store that is gone: it would confuse the next run
        _remove_tree(meta)
    return None


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def _fetch(cfg: Config, number: int, binary: Path, directory: Path,
           timeout: float) -> Restored:
    db = (directory / DB_NAME).absolute()
    partial = db.with_name(db.name + PARTIAL_SUFFIX)
    for leftover in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        leftover.unlink(missing_ok=True)
    config_path = litestream.write_config(cfg, number, log_level="warn", name=CONFIG_NAME)
    source = litestream.describe(cfg, number)
    try:
        done = subprocess.run(litestream.restore_argv(binary, config_path, db, partial),
                              capture_output=True, text=True, timeout=timeout,
                              env=litestream.child_env(), check=False)
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise RestoreFailed(f"litestream restore from {source} did not finish within "
                            f"{timeout:g} s; pass a longer --timeout") from None
    finally:
        config_path.unlink(missing_ok=True)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        said = "\n".join((done.stderr or done.stdout).strip().splitlines()[-ERROR_LINES:])
        raise RestoreFailed(f"litestream restore from {source} failed (exit code "
                            f"{done.returncode}):\n{said}")
    if not partial.exists():
        raise NothingToRestore(
            f"{source} holds no backup of instance {number}: nothing was restored. Check "
            "node.replicate_to (and node.replicate_endpoint) against where this instance "
            "replicated to, and that its credentials can list that place.")
    txid = _txid(done.stdout)
    try:
        restored = _check(partial, number, source, txid)
    except BaseException:
        _discard(partial)
        raise
    _put_in_place(partial, db)
    integrity.write_marker(directory, DB_NAME)
    restored.path = db
    return restored


def _txid(stdout: str) -> str:
    """The transaction id of ``restore -json``'s summary ("" when it gave none)."""
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(stdout).get("txid", ""))
    return ""


def _check(path: Path, number: int, source: str, txid: str) -> Restored:
    """The restored file passes the store's check at open and reads as a store."""
    try:
        conn = schema.connect(path)
        try:
            integrity.check(conn, path)
            rooms, _ = schema.load(conn)
            incoming, forwards = schema.load_moves(conn)
            counts = {rid: (n, top) for rid, n, top in conn.execute(
                "SELECT room_id, COUNT(*), MAX(seq) FROM messages GROUP BY room_id")}
        finally:
            conn.close()
    except StoreDamaged as exc:
        raise RestoreFailed(f"what {source} holds is damaged: {exc.problem}") from exc
    except sqlite3.Error as exc:
        raise RestoreFailed(f"what {source} holds cannot be read as a store ({exc})") from exc
    summaries = [RoomSummary(r.id, r.name, *counts.get(r.id, (0, 0)))
                 for r in sorted(rooms.values(), key=lambda r: (r.created_at, r.id))]
    return Restored(number, source, path, 0.0, path.stat().st_size, txid, summaries,
                    arriving=len(incoming), forwards=len(forwards))


def _put_in_place(partial: Path, db: Path) -> None:
    """Rename the checked file (and a WAL the check left, if any) to the store's name,
    durably."""
    wal = Path(f"{partial}-wal")
    if wal.exists():
        wal.replace(Path(f"{db}-wal"))
    Path(f"{partial}-shm").unlink(missing_ok=True)
    partial.replace(db)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(partial: Path) -> None:
    for path in (partial, Path(f"{partial}-wal"), Path(f"{partial}-shm")):
        path.unlink(missing_ok=True)
