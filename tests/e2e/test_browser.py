"""The chat pages in a real browser: headless Chromium against a running cluster.

The cluster is ``shardchat up`` (nodes behind the local router), so every page, asset and
WebSocket goes through the same path rules as on AWS. Each person is a separate browser
context (own cookies and localStorage). Tests wait on what a person would see (a message in
the list, a status pill) with a deadline; nothing sleeps.

Set SHARDCHAT_UPDATE_SCREENSHOTS=1 to refresh docs/screenshot-room*.png from the screenshot test.

Without Chromium (or playwright) the module is skipped on a laptop, but under ``CI=true`` it
fails instead, saying what to install: in CI a silent skip would pass a run that never
opened a page.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    browser_api,
    http_json,
    running_nodes,
    running_up,
)

UI_TIMEOUT = 15_000          # ms: generous for a 2-core machine shared with other work
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 740}
PRIVATE_TEXT = "This room is private — ask a member for the invite link"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


playwright_sync = browser_api(UI_TIMEOUT)
expect = playwright_sync.expect


# ---------------------------------------------------------------------------------------
# the cluster


@dataclass(frozen=True)
class Site:
    """Where the browser goes: the router of ``shardchat up`` (or one node as a fallback)."""

    base_url: str
    routed: bool

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    with running_up(tmp_path_factory.mktemp("site"), nodes=2) as base:
        yield Site(base, routed=True)


def create_room(site: Site, name: str, private: bool = False) -> dict[str, Any]:
    status, room = http_json("POST", site.url("/api/rooms"), {"name": name, "private": private})
    assert status == 201, f"room creation failed: {status} {room}"
    return room


def room_link(site: Site, room: dict[str, Any], invite: bool = True) -> str:
    link = site.url(room["path"])
    if invite and room.get("invite"):
        link += "?invite=" + room["invite"]
    return link


# ---------------------------------------------------------------------------------------
# the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class People:
    """Opens one browser context per person and closes them all after the test."""

    def __init__(self, browser: Any):
        self.browser = browser
        self.contexts: list[Any] = []

    def page(self, viewport: dict[str, int] | None = None, phone: bool = False) -> Any:
        options: dict[str, Any] = {"viewport": viewport or (PHONE if phone else DESKTOP)}
        if phone:
            options.update(is_mobile=True, has_touch=True, device_scale_factor=2)
        context = self.browser.new_context(**options)
        context.set_default_timeout(UI_TIMEOUT)
        self.contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.errors = errors
        return page

    def join(self, link: str, name: str, **kwargs: Any) -> Any:
        """A person opens a room link, picks a display name and waits to be connected."""
        page = self.page(**kwargs)
        page.goto(link)
        enter_name(page, name)
        expect_connected(page)
        return page

    def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):
                context.close()


@pytest.fixture
def people(browser) -> Iterator[People]:
    crowd = People(browser)
    try:
        yield crowd
    finally:
        crowd.close()


def enter_name(page: Any, name: str) -> None:
    expect(page.locator("#name-dialog")).to_be_visible()
    page.fill("#name-input", name)
    page.click("#name-submit")


def expect_connected(page: Any) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")


def send(page: Any, text: str) -> None:
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")
    expect(page.locator("#composer-input")).to_have_value("")


def messages(page: Any) -> Any:
    """Delivered messages (pending ones carry the ``pending`` class until acked)."""
    return page.locator("#messages .msg:not(.pending)")


def message(page: Any, text: str) -> Any:
    return page.locator("#messages .msg:not(.pending)", has_text=text)


def members(page: Any) -> Any:
    return page.locator("#member-list .member-name")


# ---------------------------------------------------------------------------------------
# tests


def test_landing_page_creates_a_room_and_shows_api_errors(site, people):
    page = people.page()
    page.goto(site.url("/"))
    expect(page.locator("h2#create-title")).to_have_text("Create a room")

    page.fill("#room-name", "   ")
    page.click("#create-button")
    expect(page.locator("#create-error")).to_be_visible()
    expect(page.locator("#create-error")).to_contain_text("name")

    # A name the API refuses: its own sentence is shown next to the form, and we stay here.
    page.evaluate("document.getElementById('room-name').removeAttribute('maxlength')")
    page.fill("#room-name", "x" * 150)
    page.click("#create-button")
    expect(page.locator("#create-error")).to_contain_text("100")
    assert page.url.rstrip("/") == site.base_url

    page.fill("#room-name", "Launch plan")
    expect(page.locator("#create-error")).to_be_hidden()
    page.click("#create-button")
    page.wait_for_url(re.compile(r"/i\d+/room/[A-Za-z0-9_-]+$"))
    enter_name(page, "Ana")
    expect_connected(page)
    expect(page.locator("#room-name-text")).to_have_text("Launch plan")
    expect(page.locator("#empty-state")).to_be_visible()
    assert page.errors == []


def test_landing_page_retries_a_lost_creation_and_gets_the_same_room(site, people):
    """The first try reaches the server (the room is made) but its answer is lost behind a
    502; the page tries again with the same Idempotency-Key and lands in that very room.
    The second click-to-room goes through a network error first."""
    page = people.page()
    keys: list[str] = []
    made: list[dict[str, Any]] = []

    def lose_the_first_answer(route: Any) -> None:
        keys.append(route.request.headers.get("idempotency-key", ""))
        if len(keys) == 1:
            made.append(route.fetch().json())
            route.fulfill(status=502, content_type="application/json",
                          body='{"error": "bad_gateway", "message": "target went away"}')
        elif len(keys) == 3:
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/rooms", lose_the_first_answer)
    page.goto(site.url("/"))
    page.fill("#room-name", "Retried plan")
    page.click("#create-button")
    page.wait_for_url(re.compile(r"/i\d+/room/[A-Za-z0-9_-]+$"))
    assert page.url == site.url(made[0]["path"])  # the room of the lost answer, not a new one
    assert len(keys) == 2 and keys[0] == keys[1]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", keys[0])

    page.goto(site.url("/"))
    page.fill("#room-name", "Another plan")
    page.click("#create-button")
    page.wait_for_url(re.compile(r"/i\d+/room/[A-Za-z0-9_-]+$"))
    assert len(keys) == 4 and keys[2] == keys[3] != keys[0]  # a new creation, a new key
    assert page.url != site.url(made[0]["path"])
    assert page.errors == []


def test_two_people_chat_and_see_each_other_in_the_member_list(site, people):
    room = create_room(site, "Team chat")
    ana = people.join(room_link(site, room), "Ana")
    ben = people.join(room_link(site, room), "Ben")

    for page in (ana, ben):
        expect(members(page)).to_have_count(2)
        expect(page.locator("#member-count")).to_have_text("2")
    expect(members(ana)).to_contain_text(["Ana", "Ben"], ignore_case=False)

    send(ana, "Hi Ben, <b>not bold</b> & welcome")
    expect(message(ben, "Hi Ben, <b>not bold</b> & welcome")).to_be_visible()
    expect(ben.locator("#messages b")).to_have_count(0)   # user text is never parsed as HTML
    send(ben, "Hey Ana!")
    expect(message(ana, "Hey Ana!")).to_be_visible()

    # Own messages look different from the others', on both screens.
    expect(message(ana, "Hi Ben")).to_have_class(re.compile(r"\bown\b"))
    expect(message(ben, "Hi Ben")).not_to_have_class(re.compile(r"\bown\b"))
    expect(message(ana, "Hey Ana!")).not_to_have_class(re.compile(r"\bown\b"))
    expect(message(ana, "Hey Ana!")).to_contain_text("Ben")

    ben.context.close()
    expect(members(ana)).to_have_count(1)
    assert ana.errors == []


def test_private_room_refuses_without_invite_and_admits_with_the_link(site, people):
    owner = people.page()
    owner.goto(site.url("/"))
    owner.fill("#room-name", "Board room")
    owner.locator("#room-private").check(force=True)
    owner.click("#create-button")
    owner.wait_for_url(re.compile(r"/i\d+/room/[A-Za-z0-9_-]+$"))   # invite moved out of the URL
    enter_name(owner, "Ana")
    expect_connected(owner)
    expect(owner.locator("#room-lock")).to_be_visible()

    share = owner.locator("#share-button")
    expect(share).to_have_text("Copy invite link")
    share.click()
    invite_link = owner.locator("#share-link").input_value()
    assert "?invite=" in invite_link and invite_link.startswith(owner.url)

    stranger = people.page()
    stranger.goto(owner.url)
    enter_name(stranger, "Mallory")
    expect(stranger.locator("#refusal")).to_be_visible()
    expect(stranger.locator("#refusal-text")).to_contain_text(PRIVATE_TEXT)
    expect(stranger.locator("#status")).not_to_have_attribute("data-state", "connected")

    guest = people.join(invite_link, "Ben")
    expect(members(guest)).to_have_count(2)
    expect(members(owner)).to_have_count(2)
    assert "invite=" not in guest.url

    # The invite was kept for this room: a reload gets straight back in.
    guest.reload()
    expect_connected(guest)
    expect(guest.locator("#refusal")).to_be_hidden()


def test_reloading_the_page_shows_the_history(site, people):
    room = create_room(site, "Notes")
    ana = people.join(room_link(site, room), "Ana")
    texts = ["first note", "second note", "third note"]
    for text in texts:
        send(ana, text)
    expect(messages(ana)).to_have_count(3)

    ana.reload()
    expect(ana.locator("#name-dialog")).to_be_hidden()      # the name was remembered
    expect_connected(ana)
    expect(messages(ana)).to_have_count(3)
    expect(ana.locator("#messages .msg-text")).to_have_text(texts)
    expect(message(ana, "first note")).to_have_class(re.compile(r"\bown\b"))

    # Changing the display name rejoins under the new name and keeps the conversation.
    ana.click("#change-name")
    enter_name(ana, "Ana Maria")
    expect(ana.locator("#change-name")).to_have_text("Ana Maria")
    expect(members(ana)).to_have_text(["Ana Maria"])
    expect(messages(ana)).to_have_count(3)


def test_typing_indicator_appears_for_the_other_person(site, people):
    room = create_room(site, "Typing")
    ana = people.join(room_link(site, room), "Ana")
    ben = people.join(room_link(site, room), "Ben")

    ben.locator("#composer-input").press_sequentially("hel")
    expect(ana.locator("#typing")).to_have_text("Ben is typing…")
    expect(ben.locator("#typing")).to_have_text("")     # nobody is told about themselves

    ben.fill("#composer-input", "")
    expect(ana.locator("#typing")).to_have_text("")

    ben.locator("#composer-input").press_sequentially("hello")
    expect(ana.locator("#typing")).to_have_text("Ben is typing…")
    ben.press("#composer-input", "Enter")
    expect(message(ana, "hello")).to_be_visible()
    expect(ana.locator("#typing")).to_have_text("")


def seed_messages(site: Site, room: dict[str, Any], count: int, senders: int = 4,
                  filler: str = "") -> None:
    """Post ``count`` numbered messages (``filler`` appended to each) with real Socket.IO
    clients, spread over several connections so no one connection meets the rate limit;
    returns when all are acked."""
    import socketio

    async def one_sender(index: int, numbers: list[int]) -> None:
        client = socketio.AsyncClient(reconnection=False)
        await client.connect(site.base_url, namespaces=[room["namespace"]],
                             socketio_path=room["socketio_path"], transports=["websocket"],
                             auth={"name": f"seeder {index}"}, wait_timeout=10)
        try:
            for n in numbers:
                ack = await client.call("message", {"text": f"message {n}{filler}"},
                                        namespace=room["namespace"], timeout=10)
                assert ack.get("ok"), ack
        finally:
            await client.disconnect()

    async def all_senders() -> None:
        # Sequential batches keep seq order equal to the numbering.
        per = -(-count // senders)
        for i in range(senders):
            await one_sender(i, list(range(i * per + 1, min(count, (i + 1) * per) + 1)))

    run_async(all_senders())


def test_scrolling_to_the_top_loads_older_messages(site, people):
    room = create_room(site, "Long room")
    seed_messages(site, room, 72)
    ana = people.join(room_link(site, room), "Ana")
    expect(message(ana, "message 72")).to_be_visible()
    expect(messages(ana)).to_have_count(50)          # the welcome brings the latest 50

    ana.locator("#scroller").evaluate("el => { el.scrollTop = 0; }")
    expect(messages(ana)).to_have_count(72)
    expect(ana.locator("#history-state")).to_have_text("This is the beginning of the room.")
    expect(ana.locator("#messages .msg-text").first).to_have_text("message 1")


def test_reconnect_recovers_missed_messages_and_sends_queued_ones(site, people):
    room = create_room(site, "Flaky network")
    ana = people.join(room_link(site, room), "Ana")
    ben = people.join(room_link(site, room), "Ben")
    send(ana, "before the outage")
    expect(message(ben, "before the outage")).to_be_visible()

    ben.context.set_offline(True)
    expect(ben.locator("#status")).to_have_attribute("data-state", "reconnecting")
    expect(members(ana)).to_have_count(1)
    send(ana, "missed one")
    send(ana, "missed two")
    send(ben, "written offline")
    expect(ben.locator("#messages .msg.pending")).to_contain_text("Waiting for connection")

    ben.context.set_offline(False)
    expect_connected(ben)
    expect(ben.locator("#messages .msg-text")).to_have_text(
        ["before the outage", "missed one", "missed two", "written offline"])
    expect(ben.locator("#messages .msg.pending")).to_have_count(0)
    expect(message(ana, "written offline")).to_be_visible()
    expect(messages(ana)).to_have_count(4)          # delivered exactly once


def run_async(coro: Any, timeout: float = 60) -> Any:
    """Run a coroutine in a thread with its own event loop (Playwright's sync API owns this
    thread); returns its result."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=timeout)


def impersonate(site: Site, room: dict[str, Any], name: str, victim_text: str) -> list[str]:
    """Someone joins under ``name``, finds the victim's message in the history and posts
    two messages dressed as the victim's: the very same client_id, and one that starts like
    it. Returns the texts posted (both acked)."""
    import socketio

    async def attack() -> list[str]:
        client = socketio.AsyncClient(reconnection=False)
        welcomed: asyncio.Queue = asyncio.Queue()
        client.on("welcome", welcomed.put_nowait, namespace=room["namespace"])
        await client.connect(site.base_url, namespaces=[room["namespace"]],
                             socketio_path=room["socketio_path"], transports=["websocket"],
                             auth={"name": name}, wait_timeout=10)
        try:
            welcome = await asyncio.wait_for(welcomed.get(), 10)
            copied = next(m["client_id"] for m in welcome["history"]
                          if m["text"] == victim_text)
            posted = []
            for text, client_id in (("copied client id", copied),
                                    ("same device prefix", copied.split(".")[0] + ".0f0f")):
                ack = await client.call("message", {"text": text, "client_id": client_id},
                                        namespace=room["namespace"], timeout=10)
                assert ack.get("ok"), ack
                posted.append(text)
            return posted
        finally:
            await client.disconnect()

    return run_async(attack())


def test_someone_with_your_name_and_copied_client_id_is_not_shown_as_you(site, people):
    room = create_room(site, "Look-alikes")
    ana = people.join(room_link(site, room), "Ana")
    send(ana, "the real Ana")
    expect(message(ana, "the real Ana")).to_have_class(re.compile(r"\bown\b"))

    posted = impersonate(site, room, "Ana", "the real Ana")
    for text in posted:
        expect(message(ana, text)).to_be_visible()
        expect(message(ana, text)).not_to_have_class(re.compile(r"\bown\b"))
        expect(message(ana, text)).to_contain_text("Ana")
    expect(message(ana, "the real Ana")).to_have_class(re.compile(r"\bown\b"))

    ana.reload()   # the member token is kept: after a reload only the real one is ours
    expect_connected(ana)
    expect(messages(ana)).to_have_count(3)
    expect(message(ana, "the real Ana")).to_have_class(re.compile(r"\bown\b"))
    for text in posted:
        expect(message(ana, text)).not_to_have_class(re.compile(r"\bown\b"))
    assert ana.errors == []


def pump_until(page: Any, predicate: Any, what: str, timeout_ms: int = UI_TIMEOUT) -> None:
    """Wait for a condition that Playwright's own callbacks make true: the sync API runs
    them only while it is called, so the wait is on the page, in short slices."""
    for _ in range(timeout_ms // 20):
        if predicate():
            return
        page.wait_for_timeout(20)
    raise AssertionError(f"timed out waiting for {what}")


class LoseOneAck:
    """Routes the page's Socket.IO WebSocket; once armed, the next message the page sends
    reaches the node (and is stored), but everything the node answers is lost and the
    connection drops, the way a network cut right after sending looks to the page."""

    def __init__(self) -> None:
        self.upgraded = False      # the page is on the WebSocket transport
        self.armed = False         # lose the answers to the next message the page sends
        self.losing = False
        self.cut = False           # the answers were lost and the connection dropped

    def route(self, ws: Any) -> None:
        server = ws.connect_to_server()
        ws.on_message(lambda frame: self._from_page(frame, server))
        server.on_message(lambda frame: self._from_server(frame, ws, server))

    def _from_page(self, frame: Any, server: Any) -> None:
        if frame == "5":
            self.upgraded = True
        if self.armed and isinstance(frame, str) and '["message",' in frame:
            self.armed = False
            self.losing = True
        server.send(frame)

    def _from_server(self, frame: Any, ws: Any, server: Any) -> None:
        if not self.losing:
            ws.send(frame)
            return
        if isinstance(frame, str) and frame.startswith("43"):   # the ack: cut here
            self.losing = False
            self.cut = True
            ws.close()
            server.close()


def test_a_message_whose_ack_was_lost_is_resent_and_stored_once(site, people):
    room = create_room(site, "Lost acks")
    ben = people.join(room_link(site, room), "Ben")
    lose = LoseOneAck()
    ana = people.page()
    ana.route_web_socket(re.compile(r"/socket\.io/"), lose.route)
    ana.goto(room_link(site, room))
    enter_name(ana, "Ana")
    expect_connected(ana)
    pump_until(ana, lambda: lose.upgraded, "the page to upgrade to WebSocket")

    lose.armed = True
    send(ana, "sent into the void")
    pump_until(ana, lambda: lose.cut, "the lost ack")
    expect(message(ben, "sent into the void")).to_be_visible()   # it was stored

    # The page reconnects with its member token and resends: the node knows it as a retry.
    expect_connected(ana)
    expect(ana.locator("#messages .msg.pending")).to_have_count(0)
    expect(messages(ana)).to_have_count(1)
    expect(message(ana, "sent into the void")).to_have_class(re.compile(r"\bown\b"))
    send(ben, "after the retry")
    expect(message(ana, "after the retry")).to_be_visible()
    expect(messages(ben)).to_have_count(2)       # stored and broadcast once
    ben.reload()
    expect_connected(ben)
    expect(ben.locator("#messages .msg-text")).to_have_text(
        ["sent into the void", "after the retry"])
    assert ana.errors == []


def test_reconnect_after_a_long_outage_pages_in_every_missed_message(site, people):
    """100 missed messages of 4,000 characters are more than one welcome holds (its bytes
    are bounded): the welcome brings the newest and says "more", and the page fetches the
    rest with history requests until it meets what it had, so every message shows, once."""
    room = create_room(site, "Long outage")
    ben = people.join(room_link(site, room), "Ben")
    seed_messages(site, room, 1)
    expect(message(ben, "message 1")).to_be_visible()

    ben.context.set_offline(True)
    expect(ben.locator("#status")).to_have_attribute("data-state", "reconnecting")
    seed_messages(site, room, 100, senders=8, filler=" " + "x" * 3980)
    ben.context.set_offline(False)
    expect_connected(ben)
    expect(messages(ben)).to_have_count(101)
    expect(ben.locator("#messages .msg-text").first).to_have_text("message 1")
    expect(ben.locator("#messages .msg-text").last).to_contain_text("message 100 x")


def test_screenshot_of_a_conversation(site, people, tmp_path):
    """Two people, desktop and phone, mid-conversation: the pictures in docs/."""
    room = create_room(site, "Design review", private=True)
    ana = people.join(room_link(site, room), "Ana Souza")
    ben = people.join(room_link(site, room), "Ben Okafor", phone=True)
    lines = [
        (ana, "Morning! Did everyone get a chance to look at the new onboarding flow?"),
        (ben, "Yes, the first two steps feel much lighter now."),
        (ben, "The invite screen still says \"workspace\" though."),
        (ana, "Good catch, I'll fix the copy."),
        (ana, "Shipping it after lunch."),
    ]
    for count, (page, text) in enumerate(lines, start=1):
        send(page, text)
        expect(messages(ana)).to_have_count(count)
        expect(messages(ben)).to_have_count(count)
    ben.locator("#composer-input").press_sequentially("Sounds good")
    expect(ana.locator("#typing")).to_have_text("Ben Okafor is typing…")
    ana.locator("#composer-input").blur()

    targets = [tmp_path]
    if os.environ.get("SHARDCHAT_UPDATE_SCREENSHOTS") == "1":
        targets.append(ROOT / "docs")
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        ana.screenshot(path=str(folder / "screenshot-room.png"), animations="disabled")
        ben.screenshot(path=str(folder / "screenshot-room-phone.png"), animations="disabled")
    assert (tmp_path / "screenshot-room.png").stat().st_size > 10_000

    # The phone layout keeps members in a panel that opens from the header.
    expect(ben.locator("#members-panel")).not_to_be_in_viewport()
    ben.click("#members-toggle")
    expect(ben.locator("#members-panel")).to_be_in_viewport()
    expect(members(ben)).to_have_count(2)
    ben.click("#members-close")
    expect(ben.locator("#members-panel")).not_to_be_in_viewport()


def test_node_restart_keeps_the_conversation_and_delivers_queued_messages(tmp_path, people):
    """A node drains on SIGTERM and comes back: the page rejoins by itself, the history is
    still there and a message written meanwhile is sent once the room is back."""
    with running_nodes(tmp_path, 1) as (node,):
        status, room = http_json("POST", f"{node.base_url}/api/rooms", {"name": "Restart"})
        assert status == 201, room
        ana = people.join(node.base_url + room["path"], "Ana")
        send(ana, "before the restart")
        expect(message(ana, "before the restart")).to_be_visible()

        assert node.terminate(timeout=30) == 0
        expect(ana.locator("#status")).to_have_attribute("data-state", "reconnecting")
        send(ana, "written during the restart")
        expect(ana.locator("#messages .msg.pending")).to_contain_text("Waiting for connection")

        node.start()
        expect_connected(ana)
        expect(ana.locator("#messages .msg-text")).to_have_text(
            ["before the restart", "written during the restart"])
        expect(ana.locator("#messages .msg.pending")).to_have_count(0)

        ana.reload()
        expect_connected(ana)
        expect(messages(ana)).to_have_count(2)      # stored once, durable across the restart


# ---------------------------------------------------------------------------------------
# rooms that move


def move_room(ready: dict[str, Any], secret: str, room: dict[str, Any], to: int
              ) -> dict[str, Any]:
    """``POST /internal/rooms/<id>/move`` on the room's owner, from ``up``'s ready file."""
    owner = next(n for n in ready["nodes"] if n["instance"] == room["instance"])
    status, report = http_json(
        "POST", f"http://{owner['host']}:{owner['internal_port']}/internal/rooms/{room['id']}"
        "/move", {"to": to}, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
    assert status == 200, f"the move failed: {status} {report}"
    return report


def start_sending(page: Any, count: int, every_ms: int) -> None:
    """The person sends ``count`` messages, "m 0", "m 1", ..., one every ``every_ms``, as
    fast as a quick typist; returns at once (``window.sending`` ends when all are sent)."""
    page.evaluate("""([count, every]) => {
        const input = document.getElementById("composer-input");
        const form = document.getElementById("composer");
        window.sending = (async () => {
            for (let i = 0; i < count; i++) {
                input.value = "m " + i;
                form.requestSubmit();
                await new Promise((resolve) => setTimeout(resolve, every));
            }
        })();
    }""", [count, every_ms])


def test_a_page_follows_its_room_to_another_instance_with_messages_in_flight(tmp_path, people):
    """While Ana is sending, her room moves to the other instance: her page and Ben's follow
    it, every message shows once and in order, nothing stays pending, and both address
    bars now hold the room's new path (a reload goes straight there)."""
    # A quick typist: more than the default 20 messages per 10 s would be refused.
    (tmp_path / ".shardchat").mkdir()
    (tmp_path / ".shardchat" / "shardchat.toml").write_text("[node]\nrate_limit_messages = 1000\n")
    with running_up(tmp_path, nodes=2) as base:
        ready = json.loads((tmp_path / "up-ready.json").read_text())
        config = tmp_path / ready["config"]  # relative to up's directory
        secret = tomllib.loads(config.read_text())["cluster"]["secret"]
        site = Site(base, routed=True)
        room = create_room(site, "On the move", private=True)
        target = 3 - room["instance"]
        new_path = f"/i{target}/room/{room['id']}"
        ana = people.join(room_link(site, room), "Ana")
        ben = people.join(room_link(site, room), "Ben")

        count = 40
        start_sending(ana, count, every_ms=40)
        pump_until(ana, lambda: messages(ana).count() >= 8, "the first messages to arrive")
        report = move_room(ready, secret, room, target)
        assert report["to"] == target
        ana.evaluate("window.sending")

        expected = [f"m {i}" for i in range(count)]
        for page in (ana, ben):
            expect(page.locator("#messages .msg-text")).to_have_text(expected)
            expect(page.locator("#messages .msg.pending")).to_have_count(0)
            expect_connected(page)
            assert urlsplit(page.url).path == new_path, page.url
        send(ben, "after the move")
        expect(message(ana, "after the move")).to_be_visible()

        ana.reload()
        expect_connected(ana)
        expect(ana.locator("#messages .msg-text")).to_have_text([*expected, "after the move"])
        assert urlsplit(ana.url).path == new_path
        assert ana.errors == [] and ben.errors == []


def test_a_page_left_open_on_an_instance_that_is_gone_finds_its_room(site, people):
    """A page loaded at /i9/room/<id> before instance 9 was removed: its socket reaches no
    node of 9 (the default rule sends it to a node that says 9 is gone), so the page asks
    GET /api/rooms/<id>, joins the room where it lives and shows that address."""
    room = create_room(site, "Found by lookup")
    gone = f"/i9/room/{room['id']}"
    page = people.page()
    # What the person had loaded back then: the room page, and its assets from /i9/static.
    page.route(re.compile(r"/i9/room/"),
               lambda route: route.fulfill(response=route.fetch(url=site.url(room["path"]))))
    page.route(re.compile(r"/i9/static/"), lambda route: route.continue_(
        url=route.request.url.replace("/i9/static/", "/static/")))
    page.goto(site.url(gone))
    enter_name(page, "Ana")
    expect_connected(page)
    assert urlsplit(page.url).path == room["path"], page.url
    send(page, "hello from the old link")
    expect(message(page, "hello from the old link")).to_be_visible()
    assert page.errors == []
