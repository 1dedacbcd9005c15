"""The console (/ui) in Debian's Chromium against a real gateway and two real demo servers.

Tests run in file order on one stack; the last one kills a server, so it stays last.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from collections.abc import Callable

import httpx
import openai
from playwright.sync_api import Route, expect

from tests.console.conftest import ADMIN_KEY, MODEL, ConsolePage, Stack, screenshot

WAIT_MS = 60_000
"""Generous: a demo server answers in well under a second alone, but the CI machine is shared."""


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def aborted_on_servers(stack: Stack) -> float:
    """Requests the demo servers counted as cut by their client (status 499)."""
    total = 0.0
    for server in stack.servers:
        text = httpx.get(server.url + "/metrics", timeout=5).text
        for line in re.findall(r'^lmserve:request_failure_total\{[^}]*status="499"[^}]*\} (\S+)$', text, re.M):
            total += float(line)
    return total


def test_console_files_are_served_with_a_strict_policy(stack: Stack) -> None:
    page = httpx.get(stack.url + "/ui", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text and "<style" not in page.text and " style=" not in page.text
    assert re.findall(r'<script type="module" src="(/ui/[a-z]+\.js)"></script>', page.text) == ["/ui/app.js"]
    script = httpx.get(stack.url + "/ui/app.js", timeout=10)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert httpx.get(stack.url + "/ui/", timeout=10).text == page.text
    missing = httpx.get(stack.url + "/ui/%2e%2e/%2e%2e/pyproject.toml", timeout=10)  # only shipped files
    assert missing.status_code == 404 and "content-security-policy" in missing.headers
    assert httpx.get(stack.url + "/ui/nope.js", timeout=10).json()["error"]["code"] == "not_found"
    assert httpx.post(stack.url + "/ui", timeout=10).status_code == 405


def test_a_wrong_key_shows_a_clear_message(console: ConsolePage) -> None:
    console.allow(r"status of 401")  # the browser logs the refused check itself
    page = console.open()
    page.get_by_label("Key", exact=True).fill("lms-not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("did not accept this key", timeout=WAIT_MS)
    expect(page.locator("#nav")).to_be_hidden()
    page.get_by_label("the administrator", exact=False).check()
    page.get_by_label("Key", exact=True).fill("not-the-admin-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("not the admin key", timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.length") == 0


def test_user_chats_with_a_streamed_answer_and_its_numbers(console: ConsolePage, stack: Stack) -> None:
    key = str(stack.create_key("chat-user")["key"])
    console.sign_in(key)
    page = console.page
    expect(page.get_by_label("Model", exact=True)).to_have_value(MODEL, timeout=WAIT_MS)
    page.get_by_label("System prompt").fill("You tell fortunes.")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Message", exact=False).fill("Tell me a fortune.")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("#chat-log .msg.assistant").last
    stats = answer.locator(".stats")
    expect(stats).to_contain_text("completion tokens", timeout=WAIT_MS)
    expect(stats).to_contain_text("TTFT")
    assert re.search(r"\d+ prompt \+ \d+ completion tokens", stats.inner_text())
    assert answer.locator(".text").inner_text().strip()
    curl = page.locator("#snippet-curl").text_content() or ""
    python = page.locator("#snippet-python").text_content() or ""
    assert "$LMSERVE_API_KEY" in curl and "LMSERVE_API_KEY" in python and key not in curl + python
    assert json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])["messages"][-1] == {
        "role": "user", "content": "Tell me a fortune."}
    # The key is in this tab's sessionStorage only: not in the URL, no cookie, no localStorage.
    assert page.evaluate("sessionStorage.getItem('lmserve.console.key')") == key
    assert key not in page.url and page.evaluate("document.cookie") == "" and page.evaluate("localStorage.length") == 0
    screenshot(page, "chat")


def test_stop_aborts_the_request_on_the_server(console: ConsolePage, stack: Stack) -> None:
    key = str(stack.create_key("stop-user")["key"])
    console.sign_in(key)
    page = console.page

    def long_answer(route: Route) -> None:
        # The demo model ends most answers in a few tokens; this one must still be running when stopped.
        body = json.loads(route.request.post_data or "{}")
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    page.route("**/v1/chat/completions", long_answer)
    before = aborted_on_servers(stack)
    expect(page.get_by_label("Model", exact=True)).to_have_value(MODEL, timeout=WAIT_MS)
    page.get_by_label("Max tokens").fill("440")
    page.get_by_label("Message", exact=False).fill("Tell me a long story.")
    page.get_by_role("button", name="Send").click()
    answer = page.locator("#chat-log .msg.assistant").last
    expect(answer.locator(".text")).not_to_be_empty(timeout=WAIT_MS)
    page.get_by_role("button", name="Stop").click()
    expect(answer).to_have_class(re.compile(r"\bstopped\b"), timeout=WAIT_MS)
    expect(answer.locator(".stats")).to_contain_text("stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    wait_for(lambda: aborted_on_servers(stack) > before, 30, "a demo server to count the request as aborted")


def test_admin_creates_a_key_that_works_then_revokes_it(console: ConsolePage, stack: Stack) -> None:
    console.sign_in(ADMIN_KEY, role="admin")
    page = console.page
    page.get_by_role("button", name="Keys").click()
    page.get_by_label("Name").fill("made-in-the-console")
    page.get_by_label("Models", exact=False).fill(MODEL)
    page.get_by_label("Requests per minute").fill("100")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#key-secret")
    expect(secret).to_have_text(re.compile(r"^lms-\S+$"), timeout=WAIT_MS)
    key = secret.inner_text()
    row = page.locator("#keys-table tbody tr", has_text="made-in-the-console")
    expect(row).to_contain_text("100 req/min")
    expect(row.locator(".state")).to_have_text("active")
    screenshot(page, "keys")

    curl = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", stack.url + "/v1/chat/completions",
         "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})],
        capture_output=True, text=True, timeout=60, check=True)
    assert curl.stdout == "200"

    page.get_by_role("button", name="I have copied it").click()
    expect(secret).to_be_hidden()
    row.get_by_role("button", name="Revoke key made-in-the-console").click()
    expect(row.locator(".state")).to_have_text("revoked", timeout=WAIT_MS)
    refused = httpx.post(stack.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                         json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)
    assert refused.status_code == 401

    page.get_by_role("button", name="Usage").click()
    usage_row = page.locator("#usage-table tbody tr", has_text="made-in-the-console")

    def usage_shown() -> bool:  # the ledger writes in batches: refresh until the request is there
        if usage_row.count():
            return True
        page.get_by_role("button", name="Refresh").click()
        return False

    wait_for(usage_shown, 30, "the key's usage in the table")
    expect(usage_row).to_contain_text(MODEL)
    expect(page.locator("#usage-chart svg")).to_be_visible()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download CSV").click()
    download = download_info.value
    assert download.suggested_filename == "lmserve-usage.csv"
    rows = list(csv.DictReader(io.StringIO(open(download.path(), encoding="utf-8").read())))
    mine = [r for r in rows if r["key_name"] == "made-in-the-console"]
    assert len(mine) == 1 and mine[0]["model"] == MODEL and int(mine[0]["requests"]) == 1
    assert int(mine[0]["completion_tokens"]) >= 1
    screenshot(page, "usage")


def test_user_follows_batch_jobs_downloads_the_output_and_cancels_one(console: ConsolePage, stack: Stack) -> None:
    key = str(stack.create_key("batch-user")["key"])
    client = openai.OpenAI(base_url=stack.gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def submit(lines: int, max_tokens: int) -> str:
        rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"Hi {i}"}]}}
                for i in range(lines)]
        upload = client.files.create(file=("in.jsonl", "\n".join(json.dumps(r) for r in rows).encode()),
                                     purpose="batch")
        return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id

    small = submit(2, 4)
    console.sign_in(key)
    page = console.page
    page.get_by_role("button", name="Batches").click()
    row = page.locator(f'#batches-table tr[data-batch="{small}"]')
    expect(row.locator(".status")).to_have_text("completed", timeout=WAIT_MS)  # the view polls while it runs
    expect(row).to_contain_text("2 done, 0 failed of 2")
    with page.expect_download() as download:
        row.get_by_role("button", name=f"Download the output of batch {small}").click()
    output = [json.loads(line) for line in open(download.value.path()).read().splitlines()]
    assert sorted(line["custom_id"] for line in output) == ["r0", "r1"]
    assert all(line["response"]["status_code"] == 200 for line in output)

    big = submit(40, 64)
    page.get_by_role("button", name="Refresh").click()
    page.get_by_role("button", name=f"Cancel batch {big}").click()
    status = page.locator(f'#batches-table tr[data-batch="{big}"] .status')
    expect(status).to_have_text(re.compile("^(cancelling|cancelled)$"), timeout=WAIT_MS)
    assert client.batches.retrieve(big).status in ("cancelling", "cancelled")
    screenshot(page, "batches")

    # The administrator sees both jobs with their owner, and cannot touch their files.
    page.get_by_role("button", name="Sign out").click()
    console.sign_in(ADMIN_KEY, role="admin")
    page.get_by_role("button", name="Batches").click()
    for batch_id in (small, big):
        expect(page.locator(f'#batches-table tr[data-batch="{batch_id}"]')).to_contain_text("owner ", timeout=WAIT_MS)
    assert page.locator("#batches-table button").count() == 0
    assert stack.admin("GET", "/admin/batches", params={"limit": "0"}).status_code == 400
    assert httpx.get(stack.gateway.url + "/admin/batches").status_code == 401


CONTRAST_JS = """() => {
  const parse = (c) => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(",").map(Number); return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 }; };
  const lum = ({ r, g, b }) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const background = (el) => { for (let e = el; e; e = e.parentElement) {
    const c = parse(getComputedStyle(e).backgroundColor); if (c && c.a > 0) return c; } return { r: 255, g: 255, b: 255 }; };
  const failures = [];
  for (const el of document.querySelectorAll("body *")) {
    if (!el.offsetParent || el.disabled) continue;  // hidden, SVG, or disabled (WCAG exempts those)
    if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    const style = getComputedStyle(el);
    const size = parseFloat(style.fontSize), bold = parseInt(style.fontWeight, 10) >= 700;
    const needed = size >= 24 || (size >= 18.66 && bold) ? 3 : 4.5;  // large text needs 3:1
    const [hi, lo] = [lum(parse(style.color)), lum(background(el))].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    if (ratio < needed) failures.push(`${el.tagName} "${el.textContent.trim().slice(0, 30)}": ${ratio.toFixed(2)}`);
  }
  return failures;
}"""


def test_text_meets_wcag_aa_contrast_in_every_view(console: ConsolePage, stack: Stack) -> None:
    page = console.open()
    expect(page.get_by_label("Key", exact=True)).to_be_visible(timeout=WAIT_MS)
    failures = {"signin": page.evaluate(CONTRAST_JS)}
    for role, key, views in (("user", str(stack.create_key("contrast")["key"]), ["Chat", "Batches"]),
                             ("admin", ADMIN_KEY, ["Status", "Keys", "Usage", "Batches"])):
        console.sign_in(key, role=role)
        for view in views:
            page.get_by_role("button", name=view, exact=True).click()
            page.wait_for_load_state("networkidle")
            failures[f"{role}/{view}"] = page.evaluate(CONTRAST_JS)
        page.get_by_role("button", name="Sign out").click()
    assert {name: found for name, found in failures.items() if found} == {}


def test_status_json_has_server_load_and_traffic_history(stack: Stack) -> None:
    key = str(stack.create_key("history")["key"])
    httpx.post(stack.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=60,
               json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})

    def traffic_seen() -> dict[str, object] | None:
        model = stack.admin("GET", "/admin/status").json()["models"][0]
        return model if any(p["requests_per_second"] > 0 for p in model["history"]) else None

    model = wait_for(traffic_seen, 30, "a history point with traffic")
    assert isinstance(model, dict) and model["name"] == MODEL
    servers = [b["server"] for b in model["backends"]]
    assert all(s is not None and 0.0 <= s["kv_cache_usage"] <= 1.0 and s["waiting"] >= 0 for s in servers)
    assert httpx.get(stack.url + "/admin/status", timeout=10).status_code == 401


def test_phone_width_chat_fits_the_screen(phone: ConsolePage, stack: Stack) -> None:
    key = str(stack.create_key("phone-user")["key"])
    phone.sign_in(key)
    page = phone.page
    expect(page.get_by_label("Model", exact=True)).to_have_value(MODEL, timeout=WAIT_MS)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, "chat-phone")


def test_status_page_shows_a_killed_backend_as_down(console: ConsolePage, stack: Stack) -> None:
    console.sign_in(ADMIN_KEY, role="admin")
    page = console.page
    victim = stack.servers[1]
    rows = {s.url: page.locator(f'tr[data-backend="{s.url}"]') for s in stack.servers}
    for row in rows.values():
        expect(row.locator(".health")).to_have_text("up", timeout=WAIT_MS)
        expect(row.locator("td.num").nth(3)).to_have_text(re.compile(r"^\d+(\.\d)?%$"))  # KV cache usage
    expect(page.locator(f'article[data-model="{MODEL}"] figure.chart')).to_have_count(4)
    screenshot(page, "status")
    victim.kill()
    expect(rows[victim.url].locator(".health")).to_have_text("down", timeout=15_000)
    expect(rows[victim.url].locator("td.num").nth(3)).to_have_text("–")
    expect(rows[stack.servers[0].url].locator(".health")).to_have_text("up")
