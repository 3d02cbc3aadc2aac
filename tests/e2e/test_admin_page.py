"""The ops page (``GET /admin`` on a node's internal listener) in headless Chromium, against
``shardchat up``: three nodes behind the local router, whose path rules the page checks.

The page must show every instance with its health, rooms and rule, follow the cluster as it
changes (a room created, a node killed with ``kill -9``) without a reload, and stay shut to
anyone without the cluster secret. Set SHARDCHAT_UPDATE_SCREENSHOTS=1 to refresh
docs/screenshot-admin.png.
"""

from __future__ import annotations

import json
import os
import re
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    browser_api,
    http_json,
    running_up,
)

UI_TIMEOUT = 20_000  # ms: the page refreshes every 3 s, and peers are polled every few
pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

playwright_sync = browser_api(UI_TIMEOUT)
expect = playwright_sync.expect


@pytest.fixture
def cluster(tmp_path) -> Iterator[dict[str, Any]]:
    """``shardchat up --nodes 3``: its URL, its ready file (nodes, pids, ports), its secret."""
    # on-line replication on, so the page has followers and their lag to show
    (tmp_path / ".shardchat").mkdir()
    (tmp_path / ".shardchat" / "shardchat.toml").write_text('[node]\nreplication = "async"\n')
    with running_up(tmp_path, nodes=3) as base:
        ready = json.loads((tmp_path / "up-ready.json").read_text())
        config = tomllib.loads((tmp_path / ready["config"]).read_text())
        yield {"url": base, "ready": ready, "secret": config["cluster"]["secret"]}


def admin_url(cluster: dict[str, Any], instance: int = 1, path: str = "/admin") -> str:
    node = next(n for n in cluster["ready"]["nodes"] if n["instance"] == instance)
    return f"http://{node['host']}:{node['internal_port']}{path}"


def basic(user: str, password: str) -> dict[str, str]:
    import base64
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_the_page_is_shut_without_the_cluster_secret(cluster):
    url = admin_url(cluster)
    for headers in ({}, basic("ops", "not-the-secret"), {"Authorization": "Bearer nope"}):
        status, body = http_json("GET", url, headers=headers)
        assert status == 401 and body["error"] == "unauthorized", (headers, body)
    status, data = http_json("GET", admin_url(cluster, path="/admin/cluster.json"),
                             headers=basic("anyone", cluster["secret"]))
    assert status == 200 and [r["instance"] for r in data["instances"]] == [1, 2, 3]


def row(page: Any, instance: int) -> Any:
    return page.locator(f'#instances tbody tr[data-instance="{instance}"]')


def test_the_page_shows_every_instance_and_follows_a_kill(cluster, tmp_path):
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     headless=True)
        try:
            context = browser.new_context(
                viewport={"width": 1280, "height": 560},
                http_credentials={"username": "ops", "password": cluster["secret"]})
            page = context.new_page()
            page.goto(admin_url(cluster))
            expect(page.locator("#instances tbody tr")).to_have_count(3)
            for n in (1, 2, 3):
                expect(row(page, n).locator(".health")).to_contain_text("up")
                expect(row(page, n).locator(".rule")).to_have_text("ok")
                expect(row(page, n).locator(".load")).to_have_text(re.compile(r"^\d+\.\d\d$"))
            expect(page.locator("#t-rules")).to_have_text("3 / 3")
            for n, follower in ((1, 2), (2, 3), (3, 1)):  # the ring: the next, wrapping round
                expect(row(page, n).locator(".follower")).to_have_text(f"i{follower} · 0 behind")

            # a room created through the router shows on its instance's row
            status, room = http_json("POST", cluster["url"] + "/api/rooms", {"name": "Ops"})
            assert status == 201, room
            expect(row(page, room["instance"]).locator(".rooms")).to_have_text("1")
            expect(page.locator("#t-rooms")).to_have_text("1")

            # kill -9 an instance the page is not asking: its row and its rule say so
            victim = next(n for n in cluster["ready"]["nodes"] if n["instance"] == 3)
            os.kill(victim["pid"], signal.SIGKILL)
            expect(row(page, 3).locator(".health")).to_have_text("unreachable")
            expect(row(page, 3).locator(".rule")).to_have_text("unreachable")
            expect(row(page, 3).locator(".rooms")).to_have_text("–")  # not its last numbers
            expect(row(page, 3).locator(".load")).to_have_text("–")
            expect(page.locator("#t-reachable")).to_have_text("2 / 3")
            expect(row(page, 1).locator(".health")).to_contain_text("up")
            shoot(page, tmp_path)
        finally:
            browser.close()


def shoot(page: Any, tmp_path: Path) -> None:
    targets = [tmp_path]
    if os.environ.get("SHARDCHAT_UPDATE_SCREENSHOTS") == "1":
        targets.append(ROOT / "docs")
    for folder in targets:
        page.screenshot(path=str(folder / "screenshot-admin.png"), animations="disabled")
    assert (tmp_path / "screenshot-admin.png").stat().st_size > 10_000
