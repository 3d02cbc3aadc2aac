"""Fuzz: a joined member sends ``message``, ``typing``, ``history`` and unknown events with
arbitrary JSON payloads, over a raw websocket or raw long-polling.

Every event that asks for an ack gets one, shaped as SPEC section 4 says: ``{"ok": true, ...}``
with the event's fields, or ``{"ok": false, "error": <SPEC code>, "message": <sentence>}``.
Message text that is not valid Unicode (lone surrogates) or holds control characters other
than newline and tab is refused, never stored; text that is accepted reaches the others
exactly as sent; a retry with the same ``client_id`` gets the first seq back. The sender's
connection stays up throughout, and the bystanders notice nothing (``Harness.check``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import examples
from tests.fuzz.harness import (
    ACK_ERRORS,
    NO_ANSWER,
    Harness,
    RawPolling,
    RawWebSocket,
    join,
    open_raw,
)
from tests.fuzz.strategies import (
    EVENT_NAMES,
    dumps,
    history_payloads,
    json_values,
    message_payloads,
    short,
    typing_payloads,
)

# one worker runs the whole module, so the module has one node (pytest -n 2)
pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(300), pytest.mark.xdist_group("fuzz_events")]

MAX_MESSAGE_CHARS = 4000
MAX_CLIENT_ID_CHARS = 64
OWN_EVENTS = {"message", "typing", "history"}
MAX_INT_DIGITS = 100  # engineio's JSON refuses longer integers
ACK_TIMEOUT = 4.0  # every ack of a batch, loopback: a missing one is missing


@dataclass(frozen=True)
class Event:
    name: str
    args: tuple[Any, ...]
    ack: bool

    def __repr__(self) -> str:
        return f"Event({short(self.name, 60)}, {short(self.args)}, ack={self.ack})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    @property
    def decodable(self) -> bool:
        """False when the JSON holds an integer of more than ``MAX_INT_DIGITS`` digits:
        python-socketio refuses to decode such a packet at all (a guard against slow
        big-number parsing), so the node answers it, if at all, with the ``bad_request`` refusal
        for unreadable events. Everything else must be answered."""
        return not _has_huge_int(list(self.args))

    def frame(self, namespace: str, ack_id: int | None, ascii_only: bool) -> bytes:
        body = [self.name, *self.args]
        try:
            text = dumps(body, ascii_only)
            raw = text.encode("utf-8")  # raw non-ASCII only where it is valid UTF-8
        except UnicodeEncodeError:
            raw = dumps(body, True).encode()
        head = f"42{namespace}," + ("" if ack_id is None else str(ack_id))
        return head.encode() + raw


def events() -> st.SearchStrategy[Event]:
    ack = st.sampled_from([True, True, True, False])
    one = lambda payloads: st.tuples(payloads)  # noqa: E731 - the usual single argument
    return st.one_of(
        st.builds(Event, st.just("message"), one(message_payloads()), ack),
        st.builds(Event, st.just("message"), one(message_payloads()), ack),
        st.builds(Event, st.just("history"), one(history_payloads()), ack),
        st.builds(Event, st.just("typing"), one(typing_payloads()), ack),
        st.builds(Event, st.sampled_from(sorted(OWN_EVENTS)),
                  st.lists(json_values(6), max_size=3).map(tuple), ack),
        st.builds(Event, EVENT_NAMES, st.lists(json_values(6), max_size=2).map(tuple), ack),
    )


def _has_huge_int(value: Any) -> bool:
    if _is_int(value):
        return len(str(abs(value))) > MAX_INT_DIGITS
    if isinstance(value, list):
        return any(_has_huge_int(v) for v in value)
    if isinstance(value, dict):
        return any(_has_huge_int(v) for v in value.values())
    return False


# ---------------------------------------------------------------------------------------
# what the node must answer


def _bad_char(ch: str) -> bool:
    """Lone surrogates and C0 controls other than newline and tab (SPEC: bad_request)."""
    code = ord(ch)
    return 0xD800 <= code <= 0xDFFF or (code < 32 and ch not in "\n\t") or code == 0x7F


def _doubtful_char(ch: str) -> bool:
    """C1 controls: refusing them is as right as keeping them."""
    return 0x80 <= ord(ch) <= 0x9F


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def message_outcomes(data: Any) -> set[str]:
    """The acceptable outcomes of a ``message`` payload: "ok" and/or refusal codes."""
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        return {"bad_request"}
    text = data["text"]
    if any(_bad_char(ch) for ch in text):
        return {"bad_request", "empty", "too_long"}  # any refusal, never stored
    if not text.strip():
        return {"empty"}
    utf16 = len(text.encode("utf-16-le")) // 2
    if len(text) > MAX_MESSAGE_CHARS:
        return {"too_long"}
    ok = {"ok", "too_long"} if utf16 > MAX_MESSAGE_CHARS else {"ok"}
    cid = data.get("client_id")
    if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= MAX_CLIENT_ID_CHARS):
        return {"bad_request"}
    if any(_doubtful_char(ch) for ch in text) or (
            isinstance(cid, str) and any(_bad_char(ch) or _doubtful_char(ch) for ch in cid)):
        return ok | {"bad_request"}
    return ok


def history_outcomes(data: Any) -> set[str]:
    if not isinstance(data, dict):
        return {"bad_request"}
    before, limit = data.get("before"), data.get("limit", 50)
    if before is not None and not (_is_int(before) and before >= 1):
        return {"bad_request"}
    if not (_is_int(limit) and 1 <= limit <= 100):
        return {"bad_request"}
    return {"ok"}


def assert_ack_shape(ack: Any, what: str) -> dict[str, Any]:
    assert isinstance(ack, list) and len(ack) == 1 and isinstance(ack[0], dict), (
        f"{what}: the ack is not one object: {ack!r}")
    body = ack[0]
    assert isinstance(body.get("ok"), bool), f"{what}: ack without ok: {body!r}"
    if body["ok"] is False:
        assert body.get("error") in ACK_ERRORS, f"{what}: ack with unknown error: {body!r}"
        assert isinstance(body.get("message"), str) and body["message"].strip(), (
            f"{what}: failed ack without a message: {body!r}")
    return body


class Session:
    """The hostile member: its socket, ack ids, and what the room has seen from it."""

    def __init__(self, harness: Harness, sock: RawWebSocket | RawPolling) -> None:
        self.harness = harness
        self.sock = sock
        self.ns = harness.namespace
        self.next_id = 1
        self.first_seq: dict[str, int] = {}  # client_id -> seq its first ack gave

    async def send(self, event: Event, ascii_only: bool) -> int | None:
        ack_id = None
        if event.ack:
            ack_id, self.next_id = self.next_id, self.next_id + 1
        sent = await self.sock.send(event.frame(self.ns, ack_id, ascii_only))
        assert sent, f"the node closed the member's connection before {event!r}"
        return ack_id

    async def acks(self, ids: set[int], what: str) -> dict[int, Any]:
        """Every ack in ``ids`` (the connection must stay up and answer all of them)."""
        got: dict[int, Any] = {}
        prefix = f"43{self.ns},"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACK_TIMEOUT
        for _ in range(10_000):
            if ids <= got.keys():
                return got
            frame = await self.sock.until(prefix, max(0.0, deadline - loop.time()))
            assert frame is not None, f"{what}: the node closed the member's connection"
            assert frame != NO_ANSWER, (
                f"{what}: no ack for event(s) {sorted(ids - got.keys())} within "
                f"{ACK_TIMEOUT:g}s")
            rest = frame[len(prefix):]
            idx = rest.find("[")
            got[int(rest[:idx])] = json.loads(rest[idx:])
        raise AssertionError(f"{what}: too many acks")


async def run_batch(harness: Harness, transport: str, batch: list[Event], ascii_only: bool
                    ) -> dict[int, str]:
    sock = await open_raw(harness, transport)
    session = Session(harness, sock)
    try:
        answer = await join(sock, harness.namespace)
        assert answer is not None and answer.startswith(f"40{harness.namespace},"), answer
        sent = [(event, await session.send(event, ascii_only)) for event in batch]
        what = f"events {batch!r} over {transport}"
        ids = {ack_id for event, ack_id in sent if ack_id is not None and event.decodable}
        probe_id = session.next_id
        await sock.send(f'42{harness.namespace},{probe_id}["history",{{"limit":1}}]')
        acks = await session.acks(ids | {probe_id}, what)
        probe = assert_ack_shape(acks[probe_id], f"{what}: the probe after them")
        assert probe["ok"] is True, f"{what}: the member's history probe failed: {probe!r}"
        stored: list[tuple[int, dict]] = []
        for event, ack_id in sent:
            if ack_id in acks:
                check_ack(event, acks[ack_id], stored, f"{event!r} over {transport}")
        return new_messages(harness, stored, session.first_seq, what)
    finally:
        await sock.close()


def new_messages(harness: Harness, stored: list[tuple[int, dict]],
                 first_seq: dict[str, int], what: str) -> dict[int, str]:
    """seq -> text of the messages stored for the first time (in send order), checking that
    a client_id repeated by the same member got its first seq back: nothing acked is
    stored twice. (Each example's connection is a new member, so dedup spans one.)"""
    fresh: dict[int, str] = {}
    for seq, data in stored:
        cid = data.get("client_id")
        if isinstance(cid, str):
            first = first_seq.setdefault(cid, seq)
            assert seq == first, (f"{what}: client_id {cid!r} was acked as seq {first} "
                                  f"before, now again as seq {seq}")
        if seq > harness.top_seq:
            fresh.setdefault(seq, data["text"])
        else:
            assert isinstance(cid, str), (
                f"{what}: a message without client_id was acked with an old seq {seq}")
    harness.top_seq = max([harness.top_seq, *fresh])
    return fresh


def check_ack(event: Event, ack: Any, stored: list[tuple[int, dict]], what: str) -> None:
    """The ack fits the event (SPEC 4); an accepted message goes to ``stored``."""
    data = event.args[0] if event.args else None
    if not event.decodable:
        # The node cannot read such a packet (an integer past the decoder's digit bound):
        # it may answer it only with the refusal for unreadable events.
        body = assert_ack_shape(ack, what)
        assert body == {**body, "ok": False, "error": "bad_request"}, f"{what}: {body!r}"
        return
    if event.name == "typing":
        assert ack == [] or assert_ack_shape(ack, what), f"{what}: typing acked {ack!r}"
        return
    body = assert_ack_shape(ack, what)
    outcome = "ok" if body["ok"] else body["error"]
    if event.name == "message":
        allowed = message_outcomes(data)
        assert outcome in allowed, f"{what}: acked {body!r}, expected one of {sorted(allowed)}"
        if body["ok"]:
            assert _is_int(body.get("seq")) and body["seq"] >= 1, f"{what}: {body!r}"
            assert _is_int(body.get("ts")), f"{what}: {body!r}"
            stored.append((body["seq"], data))
    elif event.name == "history":
        allowed = history_outcomes(data)
        assert outcome in allowed, f"{what}: acked {body!r}, expected one of {sorted(allowed)}"
        if body["ok"]:
            messages = body.get("messages")
            assert isinstance(messages, list), f"{what}: {body!r}"
            seqs = [m.get("seq") for m in messages]
            assert seqs == sorted(set(seqs)), f"{what}: history out of order: {seqs}"
            assert len(seqs) <= data.get("limit", 50), f"{what}: {len(seqs)} messages"
            before = data.get("before")
            assert before is None or all(s < before for s in seqs), f"{what}: {seqs}"
    elif event.name == "members":
        assert outcome in {"ok", "bad_request"}, f"{what}: acked {body!r}"
    else:
        assert outcome == "bad_request", f"{what}: an unknown event acked {body!r}"


@examples(120)
@given(batch=st.lists(events(), min_size=1, max_size=5),
       transport=st.sampled_from(["websocket", "websocket", "polling"]),
       ascii_only=st.booleans())
def test_any_event_payload_is_answered_and_harms_nobody(harness: Harness, batch: list[Event],
                                                         transport: str,
                                                         ascii_only: bool) -> None:
    harness.ready()
    accepted = harness.run(run_batch(harness, transport, batch, ascii_only))
    harness.check(f"events {batch!r} over {transport}", expect=accepted)
