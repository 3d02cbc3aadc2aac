"""The room page in a large room, in headless Chromium: a few hundred members (lean clients,
``tests/crowd.py``) and one person with a browser.

The page must show the whole room's count from the welcome, list only the welcome's first
members until the list is scrolled, then load the rest page by page, and follow a burst of
joins and leaves that the node tells as one ``presence`` batch. The node serves the page
itself (no router): the test is about the page and the node, not the path rules.

The crowd lives on an event loop in a thread of its own, since Playwright's sync API owns
the test's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests import crowd
from tests.support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SECRET,
    NodeProcess,
    browser_api,
    http_json,
    running_nodes,
)

UI_TIMEOUT = 20_000  # ms: a 2-core machine shared with other work, and a few hundred clients
CROWD = 350
WELCOME_MEMBERS = 100  # the node's default: what the page lists before any scrolling
PAGE = 100  # members per page the page asks for (room.js MEMBERS_PAGE)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

playwright_sync = browser_api(UI_TIMEOUT)
expect = playwright_sync.expect


class CrowdLoop:
    """An asyncio loop in a daemon thread that runs the lean members."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="crowd",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[NodeProcess]:
    with running_nodes(tmp_path_factory.mktemp("large-page"), 1) as (n,):
        yield n


@pytest.fixture
def crowd_loop() -> Iterator[CrowdLoop]:
    runner = CrowdLoop()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def page() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(UI_TIMEOUT)
            tab = context.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda exc: errors.append(str(exc)))
            tab.errors = errors
            yield tab
        finally:
            browser.close()


def create_room(node: NodeProcess, name: str) -> dict[str, Any]:
    status, room = http_json("POST", f"{node.internal_url}/internal/rooms",
                             {"name": name, "private": False},
                             headers={"Authorization": f"Bearer {SECRET}"})
    assert status == 201, room
    return room


def names(page: Any) -> Any:
    return page.locator("#member-list .member-name")


def scroll_members_to_end(page: Any) -> None:
    page.locator("#member-list").evaluate("list => { list.scrollTop = list.scrollHeight; }")


def test_a_large_room_shows_its_count_loads_the_list_lazily_and_follows_batches(
        node, crowd_loop, page):
    room = create_room(node, "Town hall")
    early = crowd_loop.run(crowd.join_in_order(node, room, CROWD))
    burst: list[crowd.LeanMember] = []
    try:
        page.goto(node.base_url + room["path"])
        expect(page.locator("#name-dialog")).to_be_visible()
        page.fill("#name-input", "Viewer")
        page.click("#name-submit")
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")

        total = CROWD + 1
        expect(page.locator("#member-count")).to_have_text(str(total))
        # only the welcome's members, and us: nothing is paged until the list is scrolled
        expect(names(page)).to_have_count(WELCOME_MEMBERS + 1)
        expect(names(page).first).to_have_text("Viewer")
        expect(names(page).nth(1)).to_have_text(early[0].welcome["you"]["name"])
        expect(page.locator("#members-more")).to_be_visible()

        shown = WELCOME_MEMBERS + 1
        for _ in range(10):  # one page per scroll to the end
            if shown >= total:
                break
            shown = min(shown + PAGE, total)
            scroll_members_to_end(page)
            expect(names(page)).to_have_count(shown)
        assert shown == total
        expect(page.locator("#members-more")).to_be_hidden()
        listed = names(page).all_inner_texts()
        assert listed[1:] == [m.welcome["you"]["name"] for m in early], "join order"

        # a burst of joins and then of leaves: each a batch, the count and list follow
        burst = crowd_loop.run(crowd.join_at_once(node, room, 10, prefix="late"))
        expect(page.locator("#member-count")).to_have_text(str(total + 10))
        expect(names(page)).to_have_count(total + 10)
        expect(page.locator("#member-list")).to_contain_text("late-9")
        crowd_loop.run(crowd.leave_all(early[:5]))
        expect(page.locator("#member-count")).to_have_text(str(total + 5))
        expect(names(page)).to_have_count(total + 5)
        expect(page.locator(f'#member-list [data-sid="{early[0].sid}"]')).to_have_count(0)
        assert page.errors == []
    finally:
        crowd_loop.run(crowd.leave_all(early + burst))
