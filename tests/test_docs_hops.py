"""The hops of "The life of a message" (docs/architecture.md) exist in the code.

That section names each hop of a chat message as `path.py:Qualified.name`, our own modules
and the libraries' alike. A function renamed or moved without the doc would leave a
newcomer following a path that is not there any more; this test resolves every reference
(the file, the module, then the qualified name attribute by attribute) so that the suite
fails instead. Our files are looked for in this checkout, the libraries' in the
site-packages they are imported from.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT

DOC = ROOT / "docs" / "architecture.md"
SECTION = "## The life of a message"
OWN = ("shardchat/", "provisioner/")  # read from this checkout; anything else is a library

# `shardchat/node/rooms.py:RoomService.message`, `engineio/async_socket.py:AsyncSocket.poll`
REFERENCE = re.compile(r"((?:\w+/)*\w+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")

# The hops a reader of the section must find whatever else it says: where a frame enters
# on each transport, the commit, the fan-out, and the GET that takes the broadcast.
ESSENTIAL = {
    "shardchat/node/engine/session.py:EngineSession.on_message",
    "shardchat/node/engine/inbound.py:Inbound.dispatch",
    "engineio/async_socket.py:AsyncSocket.handle_post_request",
    "engineio/async_socket.py:AsyncSocket.handle_get_request",
    "shardchat/node/rooms.py:RoomService.message",
    "shardchat/node/store/__init__.py:Store.append_message",
    "shardchat/node/store/writer.py:GroupCommitWriter._commit",
    "shardchat/node/engine/delivery.py:FastDelivery.emit",
    "shardchat/node/engine/stock.py:StockDelivery.emit",
}


@dataclass(frozen=True)
class Hop:
    path: str  # the file, relative to the checkout or to site-packages
    name: str  # the qualified name inside its module

    def __str__(self) -> str:
        return f"{self.path}:{self.name}"


def section(text: str, heading: str = SECTION) -> str:
    """The lines from ``heading`` to the next heading of the same level (or the end)."""
    lines = text.splitlines()
    start = lines.index(heading)  # ValueError: the section is gone
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    return "\n".join(lines[start:end])


def hops(text: str) -> tuple[list[Hop], list[str]]:
    """Every `path.py:Name` code span of ``text``, and the code spans that look like one
    (they hold ``.py:``) but are not of that exact form, so they would go unchecked."""
    found: list[Hop] = []
    malformed: list[str] = []
    for span in CODE_SPAN.findall(text):
        if ".py:" not in span:
            continue
        match = REFERENCE.fullmatch(span)
        if match is None:
            malformed.append(span)
        else:
            found.append(Hop(match.group(1), match.group(2)))
    return found, malformed


def module_name(path: str) -> str:
    """``engineio/async_socket.py`` -> ``engineio.async_socket``; a package's
    ``__init__.py`` is the package."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def expected_file(path: str) -> Path | None:
    """Where ``path`` must be: in this checkout for our own code, else in the directory
    the library's top-level package is installed in; None when that library is absent."""
    if path.startswith(OWN):
        return ROOT / path
    spec = importlib.util.find_spec(path.split("/")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent / path


def problem(hop: Hop) -> str | None:
    """Why ``hop`` does not lead anywhere, or None when it resolves."""
    where = expected_file(hop.path)
    if where is None or not where.is_file():
        return f"{hop}: there is no file {hop.path}"
    try:
        obj = importlib.import_module(module_name(hop.path))
    except ImportError as exc:
        return f"{hop}: {module_name(hop.path)} cannot be imported ({exc})"
    if Path(obj.__file__).resolve() != where.resolve():
        return f"{hop}: {module_name(hop.path)} is imported from {obj.__file__}, not {where}"
    for part in hop.name.split("."):
        if not hasattr(obj, part):
            return f"{hop}: {getattr(obj, '__name__', obj)!s} has no {part}"
        obj = getattr(obj, part)
    return None


def test_every_hop_of_the_life_of_a_message_exists() -> None:
    found, malformed = hops(section(DOC.read_text()))
    assert not malformed, f"references not of the form `path.py:Qualified.name`: {malformed}"
    problems = [p for p in map(problem, found) if p is not None]
    assert not problems, "docs/architecture.md names hops that do not exist:\n" + "\n".join(
        problems)
    missing = ESSENTIAL - {str(h) for h in found}
    assert not missing, f"the section no longer names these hops: {sorted(missing)}"


def test_a_renamed_hop_is_caught() -> None:
    """What the doc test relies on: names, files and libraries that are not there are
    reported, each with what is wrong, and a reference that went out of shape too."""
    text = ("`shardchat/node/rooms.py:RoomService.message`"
            " `engineio/async_socket.py:AsyncSocket.poll`"
            " `shardchat/node/rooms.py:RoomService.no_such_hop`"
            " `engineio/async_socket.py:AsyncSocket.no_such_hop`"
            " `shardchat/node/no_such_module.py:Anything`"
            " `no_such_library/mod.py:Anything`"
            " `shardchat/node/rooms.py:RoomService.message()`")
    found, malformed = hops(text)
    assert malformed == ["shardchat/node/rooms.py:RoomService.message()"]
    reported = {str(h): problem(h) for h in found}
    assert reported["shardchat/node/rooms.py:RoomService.message"] is None
    assert reported["engineio/async_socket.py:AsyncSocket.poll"] is None
    assert "has no no_such_hop" in reported["shardchat/node/rooms.py:RoomService.no_such_hop"]
    assert "has no no_such_hop" in reported["engineio/async_socket.py:AsyncSocket.no_such_hop"]
    assert "no file" in reported["shardchat/node/no_such_module.py:Anything"]
    assert "no file" in reported["no_such_library/mod.py:Anything"]
