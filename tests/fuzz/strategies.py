"""Hypothesis strategies for hostile input: text, JSON values, Socket.IO frames.

The alphabet leans on what breaks parsers and stores: lone surrogates (which JSON can carry
as ``\\ud800`` escapes but UTF-8 cannot encode), C0 and C1 control characters, NUL, BOM,
bidi overrides, non-characters, astral characters. Numbers go past 64 bits and past float
range; nesting goes past every recursion limit; strings go up to the node's packet limit.
Everything is bounded in size so one example stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

MAX_PACKET_BYTES = 64 * 1024  # node.max_packet_bytes default (the fuzz node keeps it)
SHORT_REPR = 240  # characters of a failing input shown in a report


def short(value: Any, limit: int = SHORT_REPR) -> str:
    """``repr`` cut down to ``limit`` characters, saying how long the whole was: a failing
    10,000-deep nest must not bury the report."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit * 2 // 3]}...{text[-limit // 3:]} ({len(text):,} chars in all)"


class Blob(bytes):
    """Bytes whose repr (and hypothesis' report of them) is ``short``."""

    def __repr__(self) -> str:
        return short(bytes(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class Text(str):
    """A string whose repr (and hypothesis' report of it) is ``short``."""

    def __repr__(self) -> str:
        return short(str(self))

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]
CONTROLS = ["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\r", "\x1b", "\x1c", "\x1f",
            "\x7f", "\x80", "\x85", "\x9f"]
ODD = ["\n", "\t", " ", "\u00a0", "\u2028", "\u2029", "\u202e", "\u200b", "\ufeff", "\ufffd",
       "\uffff", "\ufdd0", "\U0001f600", "\U0010ffff", "é", "ß", "中", "\u0301", '"', "\\",
       "/", ",", "[", "{", "\x1e"]
HOSTILE_CHARS = SURROGATES + CONTROLS + ODD


def hostile_text(max_size: int = 40) -> st.SearchStrategy[str]:
    """Short strings mixing ordinary text with every character class above."""
    return st.one_of(
        st.text(max_size=max_size),
        st.text(st.sampled_from(HOSTILE_CHARS), min_size=1, max_size=max_size),
        st.lists(st.one_of(st.text(max_size=8), st.sampled_from(HOSTILE_CHARS)),
                 max_size=max_size // 4 + 1).map("".join),
    )


def long_text(limit: int = MAX_PACKET_BYTES + 2048) -> st.SearchStrategy[str]:
    """One character repeated up to just past the packet limit (both sides of it)."""
    return st.builds(lambda ch, n: ch * n, st.sampled_from(["x", "é", "\U0001f600", "\x00",
                                                            "\ud800", " "]),
                     st.one_of(st.integers(3990, 4010), st.integers(0, limit)))


HUGE_INTS = st.one_of(st.integers(), st.integers(-(2 ** 64) - 5, -(2 ** 63) + 5),
                      st.integers(2 ** 63 - 5, 2 ** 64 + 5), st.integers(10 ** 30, 10 ** 40),
                      st.sampled_from([0, -1, 1, 2 ** 53 + 1, 10 ** 300]))
LEAVES = st.one_of(st.none(), st.booleans(), HUGE_INTS, st.floats(allow_nan=True,
                                                                  allow_infinity=True),
                   hostile_text())


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON-shaped value (plus NaN and infinities, which Python's json writes)."""
    return st.recursive(
        LEAVES,
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(hostile_text(12), inner, max_size=4)),
        max_leaves=max_leaves)


def dumps(value: Any, ascii_only: bool = True) -> str:
    """JSON text; lone surrogates become ``\\ud800`` escapes when ``ascii_only``, else they
    stay raw (the frame is then invalid UTF-8 once encoded with surrogatepass)."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True, separators=(",", ":"))


@st.composite
def deep_nesting(draw: st.DrawFn) -> str:
    """JSON nested far past recursion limits: ``[[[...]]]`` or ``{"a":{"a":...}}``."""
    depth = draw(st.one_of(st.integers(100, 1100), st.integers(4900, 6000)))
    if draw(st.booleans()):
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


HUGE_NUMBERS = st.one_of(
    st.integers(19, 400).map(lambda n: "9" * n),
    st.sampled_from(["1e999999", "-1e999999", "1e-999999", "-0", "NaN", "Infinity",
                     "-Infinity", "0." + "0" * 1000 + "1", "1" + "0" * 4400, "00012", "+1"]),
)

EVENT_NAMES = st.one_of(st.sampled_from(["message", "typing", "history", "members", "welcome",
                                         "presence", "connect", "disconnect", "connect_error",
                                         "newListener", "*", ""]),
                        hostile_text(20))


# ---------------------------------------------------------------------------------------
# raw Socket.IO frames


@dataclass(frozen=True)
class Frame:
    """One hostile Engine.IO frame, rendered once the room's namespace is known."""

    def __repr__(self) -> str:
        return (f"Frame(eio={self.eio!r}, sio={self.sio!r}, attachments={self.attachments}, "
                f"namespace={short(self.namespace, 60)}, ack={short(self.ack, 40)}, "
                f"body={short(self.body)}, encoding={self.encoding!r}, text={self.text})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    eio: str  # Engine.IO packet type ("4" is MESSAGE)
    sio: str  # Socket.IO packet type after a MESSAGE ("" for other Engine.IO packets)
    attachments: int | None  # binary packets announce attachments as "<n>-"
    namespace: str  # "room", "other" (a room not joined), "" (main namespace) or literal
    ack: str  # ack id digits ("" for none)
    body: str
    encoding: str  # "utf-8" (lone surrogates kept: invalid UTF-8), "broken" or "latin-1"
    text: bool  # a TEXT websocket frame, else BINARY

    def render(self, room_ns: str, other_ns: str) -> bytes:
        ns = {"room": room_ns + ",", "other": other_ns + ",", "": ""}.get(
            self.namespace, self.namespace)
        head = self.eio
        if self.eio == "4":
            att = "" if self.attachments is None else f"{self.attachments}-"
            head += self.sio + att + ns + self.ack
        raw = head + self.body
        if self.encoding == "latin-1":
            return raw.encode("latin-1", "replace")
        data = raw.encode("utf-8", "surrogatepass")  # lone surrogates: invalid UTF-8
        if self.encoding == "broken":  # a stray continuation and a cut-off sequence
            cut = len(head.encode("utf-8", "surrogatepass"))
            data = data[:cut] + b"\x80\xc3(" + data[cut:] + b"\xe2\x82"
        return data

    @property
    def wants_attachments(self) -> bool:
        """The node will read the next frames of this socket as binary attachments."""
        return self.eio == "4" and self.sio in ("5", "6") and bool(self.attachments)


def event_body(names: st.SearchStrategy[str] = EVENT_NAMES) -> st.SearchStrategy[str]:
    """A JSON array that looks like an event: a name, then arbitrary arguments."""
    return st.builds(lambda name, args, ascii_only: dumps([name, *args], ascii_only),
                     names, st.lists(json_values(), max_size=3), st.booleans())


BODIES = st.one_of(
    event_body(),
    event_body(st.just("message")),
    st.builds(dumps, json_values()),
    deep_nesting(),
    deep_nesting().map(lambda nest: f'["message",{nest}]'),
    HUGE_NUMBERS.map(lambda n: f'["history",{{"before":{n},"limit":5}}]'),
    HUGE_NUMBERS,
    long_text().map(lambda t: dumps(["message", {"text": t}])),
    hostile_text(60),
    st.just(""),
)


def frames() -> st.SearchStrategy[Frame]:
    """Mostly Socket.IO packets with a broken part; sometimes not Engine.IO at all."""
    return st.builds(
        Frame,
        eio=st.one_of(st.just("4"), st.just("4"), st.sampled_from(list("0123456789")),
                      hostile_text(3)),
        sio=st.one_of(st.sampled_from(list("0123456")), st.sampled_from(list("789")),
                      hostile_text(2)),
        attachments=st.one_of(st.none(), st.none(), st.integers(0, 3),
                              st.sampled_from([10 ** 6, 10 ** 30])),
        namespace=st.one_of(st.sampled_from(["room", "room", "other", ""]),
                            hostile_text(30).map(lambda s: "/" + s + ","),
                            st.sampled_from(["/i1/room/..,", "/i2/room/x,", "/i1/room/",
                                             "/" + "a" * 5000 + ",", "/,", "//,"])),
        ack=st.one_of(st.just(""), st.integers(0, 10 ** 6).map(str),
                      st.integers(19, 40).map(lambda n: "9" * n), st.just("-1")),
        body=BODIES,
        encoding=st.sampled_from(["utf-8", "utf-8", "broken", "latin-1"]),
        text=st.sampled_from([True, True, True, False]),
    )


# ---------------------------------------------------------------------------------------
# event payloads for a joined client


def message_payloads() -> st.SearchStrategy[Any]:
    """``message`` payloads: mostly the right shape with hostile text, sometimes anything."""
    texts = st.one_of(hostile_text(60), long_text(4100), st.text(min_size=1, max_size=80))
    return st.one_of(
        st.fixed_dictionaries({"text": texts},
                              optional={"client_id": st.one_of(hostile_text(70), LEAVES)}),
        st.fixed_dictionaries({"text": json_values(6)}),
        json_values(),
    )


def history_payloads() -> st.SearchStrategy[Any]:
    numbers = st.one_of(HUGE_INTS, LEAVES)
    return st.one_of(st.fixed_dictionaries({}, optional={"before": numbers, "limit": numbers}),
                     json_values())


def typing_payloads() -> st.SearchStrategy[Any]:
    return st.one_of(st.fixed_dictionaries({"typing": json_values(4)}), json_values())
