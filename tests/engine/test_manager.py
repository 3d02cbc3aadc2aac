"""The fast engine's client manager keeps python-socketio's tables exactly as the library's
own manager does, through connects, rooms, pending disconnects and leaves, and a leave
costs the same in a namespace of thousands as in one of ten; it knows each Engine.IO
session's namespaces, which the library finds by visiting every namespace."""

from __future__ import annotations

import random
from typing import Any

import socketio

from shardchat.node.engine.manager import IndexedManager, _PendingSids


def tables(manager: Any, names: dict[str, str]) -> list:
    """What python-socketio keeps (rooms with each room's sid -> Engine.IO sid, callbacks,
    the pending connect and disconnect lists), each sid renamed by ``names`` (the two
    managers generate sids of their own), as sorted text."""
    return _named([manager.rooms, manager.callbacks, manager.pending_connect,
                   manager.pending_disconnect], names)


def _named(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return sorted((str(_named(k, names)), _named(v, names)) for k, v in value.items())
    if isinstance(value, list | tuple | _PendingSids):  # ours keeps a pending list as a set
        return [_named(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def managers() -> tuple[Any, Any]:
    ours, theirs = IndexedManager(), socketio.AsyncManager()
    for manager in (ours, theirs):
        socketio.AsyncServer(async_mode="aiohttp", client_manager=manager)
    return ours, theirs


async def test_the_tables_stay_those_of_the_librarys_manager():
    ours, theirs = managers()
    rng = random.Random(3)
    connected: list[tuple[str, str, str, str]] = []  # (namespace, ours, theirs, eio sid)
    ours_names: dict[str, str] = {}
    theirs_names: dict[str, str] = {}
    for step in range(600):
        roll = rng.random()
        if roll < 0.45 or not connected:
            # a session connects a second namespace now and then
            ns = rng.choice(("/a", "/b", "/c"))
            eio = connected[-1][3] if connected and rng.random() < 0.3 else f"eio{step}"
            if ns in ours.namespaces_of(eio):
                continue
            a, b = await ours.connect(eio, ns), await theirs.connect(eio, ns)
            ours_names[a] = theirs_names[b] = f"member{step}"
            connected.append((ns, a, b, eio))
        elif roll < 0.6:
            ns, a, b, _ = rng.choice(connected)
            room = rng.choice(("r1", "r2"))
            await ours.enter_room(a, ns, room)
            await theirs.enter_room(b, ns, room)
        elif roll < 0.7:
            ns, a, b, _ = rng.choice(connected)
            await ours.leave_room(a, ns, "r1")
            await theirs.leave_room(b, ns, "r1")
        elif roll < 0.8:
            ns, a, b, _ = rng.choice(connected)
            ours.callbacks[a], theirs.callbacks[b] = {1: None}, {1: None}
            assert sorted(_named(ours.get_rooms(a, ns), ours_names)) == sorted(
                _named(theirs.get_rooms(b, ns), theirs_names))
        else:
            ns, a, b, _ = connected.pop(rng.randrange(len(connected)))
            if rng.random() < 0.5:  # its disconnect handler runs first, as in a server
                ours.pre_disconnect(a, ns)
                theirs.pre_disconnect(b, ns)
            await ours.disconnect(a, ns)
            await theirs.disconnect(b, ns)
        assert tables(ours, ours_names) == tables(theirs, theirs_names), step
        assert _sessions(ours) == _sessions(theirs), step
    for ns, a, b, _ in connected:
        await ours.disconnect(a, ns)
        await theirs.disconnect(b, ns)
    assert tables(ours, {}) == tables(theirs, {}) == [[], [], [], []]
    assert ours._rooms_of == {} and ours._namespaces_of == {}, \
        "nothing of a sid that left is kept"


def _sessions(manager: Any) -> dict[str, list[str]]:
    """Engine.IO sid -> its namespaces, sorted: from our index, or (the library's manager)
    by visiting every namespace as its server does when a connection ends."""
    if isinstance(manager, IndexedManager):
        eios = {eio for spaces in manager.rooms.values() for eio in spaces.get(None, {}).values()}
        return {eio: sorted(manager.namespaces_of(eio)) for eio in eios}
    out: dict[str, list[str]] = {}
    for ns in manager.get_namespaces():
        for eio in manager.rooms[ns].get(None, {}).values():
            out.setdefault(eio, []).append(ns)
    return {eio: sorted(spaces) for eio, spaces in out.items()}


def test_pending_sids_behave_as_the_list_they_replace():
    """``append``, ``remove``, ``in``, ``len`` and iteration as a list of sids, duplicates
    counted, ``remove`` of a sid not there a ValueError."""
    pending, plain = _PendingSids(), []
    for sid in ("a", "b", "a", "c"):
        pending.append(sid)
        plain.append(sid)
    for sid in ("a", "c"):
        pending.remove(sid)
        plain.remove(sid)
    assert sorted(pending) == sorted(plain) and len(pending) == len(plain) == 2
    assert "a" in pending and "c" not in pending and bool(pending)
    try:
        pending.remove("c")
    except ValueError:
        pass
    else:
        raise AssertionError("removing a sid that is not pending must raise")


class NoScan(dict):
    """A namespace's room table that refuses to be walked or copied: a leave that scans
    it (the library's ``basic_disconnect``) raises."""

    def _refuse(self, *args: Any) -> Any:
        raise AssertionError("the leave scanned every room of the namespace")

    copy = items = keys = values = __iter__ = _refuse


async def test_a_leave_does_not_scan_the_namespace():
    """Every member of a namespace of 2,000 leaves without the namespace's room table being
    walked (the library's manager copies it and looks in every sid's room on each leave:
    O(members) per leave), and the table is empty at the end."""
    for manager, scans in zip(managers(), (False, True), strict=True):
        sids = [await manager.connect(f"eio{i}", "/room") for i in range(2000)]
        manager.rooms["/room"] = NoScan(manager.rooms["/room"])
        try:
            for sid in sids:
                manager.pre_disconnect(sid, "/room")
                await manager.disconnect(sid, "/room")
        except AssertionError:
            assert scans, "the fast engine's manager scanned the namespace"
            continue
        assert not scans, "the library's manager is expected to scan (the check checks)"
        assert not manager.rooms and not manager.pending_disconnect


async def test_a_lost_connection_visits_only_its_own_namespaces():
    """A server with our manager ends a connection by disconnecting the namespaces that
    session is in, never by walking every namespace the node has: with 300 other rooms
    connected, the manager's namespace list is not read, and the session's two rooms and
    their disconnect handlers are done."""
    from shardchat.config import NodeSettings
    from shardchat.node.engine.server import NodeSocketServer

    sio = NodeSocketServer(NodeSettings())
    manager = sio.manager
    left: list[tuple[str, str]] = []

    @sio.on("disconnect", namespace="*")
    async def disconnect(namespace, sid, reason=None):
        left.append((namespace, sid))

    for i in range(300):
        await manager.connect(f"other{i}", f"/room{i}")
    mine = {ns: await manager.connect("mine", ns) for ns in ("/room7", "/room250")}

    def refuse() -> Any:
        raise AssertionError("the end of a connection walked every namespace")

    manager.get_namespaces = refuse
    await sio._handle_eio_disconnect("mine", sio.reason.TRANSPORT_CLOSE)
    assert sorted(left) == sorted(mine.items())
    assert manager.namespaces_of("mine") == []
    for ns, sid in mine.items():
        assert not manager.is_connected(sid, ns)
        assert manager.sid_from_eio_sid("other7" if ns == "/room7" else "other250", ns)
    assert len(manager.rooms) == 300
