"""The fast engine's client manager keeps python-socketio's tables exactly as the library's
own manager does, through connects, rooms, pending disconnects and leaves, and a leave
costs the same in a namespace of thousands as in one of ten."""

from __future__ import annotations

import random
from typing import Any

import socketio

from shardchat.node.engine.manager import IndexedManager


def tables(manager: Any, names: dict[str, str]) -> list:
    """What python-socketio keeps (rooms with each room's sid -> Engine.IO sid, callbacks,
    the pending connect and disconnect lists), each sid renamed by ``names`` (the two
    managers generate sids of their own), as sorted text."""
    return _named([manager.rooms, manager.callbacks, manager.pending_connect,
                   manager.pending_disconnect], names)


def _named(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, dict) or hasattr(value, "items"):
        return sorted((str(_named(k, names)), _named(v, names)) for k, v in value.items())
    if isinstance(value, list | tuple):
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
    connected: list[tuple[str, str, str]] = []  # (namespace, sid in ours, sid in theirs)
    ours_names: dict[str, str] = {}
    theirs_names: dict[str, str] = {}
    for step in range(600):
        roll = rng.random()
        if roll < 0.45 or not connected:
            ns, eio = rng.choice(("/a", "/b", "/c")), f"eio{step}"
            a, b = await ours.connect(eio, ns), await theirs.connect(eio, ns)
            ours_names[a] = theirs_names[b] = f"member{step}"
            connected.append((ns, a, b))
        elif roll < 0.6:
            ns, a, b = rng.choice(connected)
            room = rng.choice(("r1", "r2"))
            await ours.enter_room(a, ns, room)
            await theirs.enter_room(b, ns, room)
        elif roll < 0.7:
            ns, a, b = rng.choice(connected)
            await ours.leave_room(a, ns, "r1")
            await theirs.leave_room(b, ns, "r1")
        elif roll < 0.8:
            ns, a, b = rng.choice(connected)
            ours.callbacks[a], theirs.callbacks[b] = {1: None}, {1: None}
            assert sorted(_named(ours.get_rooms(a, ns), ours_names)) == sorted(
                _named(theirs.get_rooms(b, ns), theirs_names))
        else:
            ns, a, b = connected.pop(rng.randrange(len(connected)))
            if rng.random() < 0.5:  # its disconnect handler runs first, as in a server
                ours.pre_disconnect(a, ns)
                theirs.pre_disconnect(b, ns)
            await ours.disconnect(a, ns)
            await theirs.disconnect(b, ns)
        assert tables(ours, ours_names) == tables(theirs, theirs_names), step
    for ns, a, b in connected:
        await ours.disconnect(a, ns)
        await theirs.disconnect(b, ns)
    assert tables(ours, {}) == tables(theirs, {}) == [[], [], [], []]
    assert ours._rooms_of == {}, "nothing of a sid that left is kept"


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
