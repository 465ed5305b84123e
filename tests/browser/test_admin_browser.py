"""The operator's pages in a real browser: an owner drives every page and its actions in
both languages (axe finds nothing serious, screenshots on request); an admin answers a
ticket a key holder opened from a row of their request log, in both languages; a viewer
sees every page and gets no form that changes anything; a user reaches none of them.
Waits are bounded waits on conditions (URLs, selectors), never sleeps."""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pyotp
import pytest

from tests.admin_client import TOTP_SECRET, make_operator
from tests.browser.site import Site
from tests.browser.test_console_browser import SHOTS, ZH, _axe, _email, _eventually, _fund, sign_up
from tests.console_client import PASSWORD as OPERATOR_PASSWORD

ADMIN_PAGES = [("overview", "/admin"), ("users", "/admin/users"), ("user", "/admin/users/{user}"),
               ("keys", "/admin/keys"), ("groups", "/admin/groups"), ("invites", "/admin/invites"),
               ("channels", "/admin/channels"),
               ("channel", "/admin/channels/mock-openai"), ("prices", "/admin/prices"),
               ("price-versions", "/admin/prices/gpt-4o-mini"), ("codes", "/admin/codes"),
               ("plans", "/admin/plans"), ("announcements", "/admin/announcements"),
               ("tickets", "/admin/tickets?state=all"), ("logs", "/admin/logs"),
               ("audit", "/admin/audit"), ("settings", "/admin/settings")]


def _shoot(page: Any, name: str) -> None:
    if os.environ.get("TOLLWAY_SCREENSHOTS") == "1":
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def operator_login(site: Site, ctx: Any, role: str, lang: str = "en") -> tuple[Any, int]:
    uid, email = site.run(make_operator(site.h, role))
    site.run(_set_lang(site, uid, lang))
    page = ctx.new_page()
    page.goto(site.url + "/console/login")
    page.fill("#email", email)
    page.fill("#password", OPERATOR_PASSWORD)
    page.click("form[data-testid=login] button[type=submit]")
    if role in ("owner", "admin"):
        page.wait_for_url("**/console/login/2fa**")
        page.fill("#code", pyotp.TOTP(TOTP_SECRET).now())
        page.click("form[action='/console/login/2fa'] button[type=submit]")
    page.wait_for_url(re.compile(r".*/console$"))
    return page, uid


async def _set_lang(site: Site, uid: int, lang: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(site.h.dsn)
    try:
        await conn.execute("UPDATE users SET lang = $2 WHERE id = $1", uid, lang)
    finally:
        await conn.close()


def _ok(page: Any) -> None:
    """The last action went through: no error shown."""
    assert page.locator("p.error").count() == 0, page.locator("p.error").first.inner_text()


@pytest.mark.parametrize("lang", ["en", ZH])
def test_an_owner_drives_every_operator_page(site: Site, browser: Any, lang: str) -> None:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    try:
        page, _ = operator_login(site, ctx, "owner", lang)
        holder = _email()
        kh = ctx.browser.new_context()
        try:
            sign_up(site, kh.new_page(), holder)
        finally:
            kh.close()
        # Users: search, open, adjust the balance (a top-up with its note).
        page.goto(site.url + "/admin/users")
        page.fill("#f-q", holder[:8])
        page.click("form[role=search] button[type=submit]")
        page.wait_for_selector("[data-testid=user-row]")
        user_id = page.locator("[data-testid=user-row]").first.get_attribute("data-user-id")
        page.locator("[data-testid=user-row] a").first.click()
        page.wait_for_url(f"**/admin/users/{user_id}")
        page.fill("#a-amount", "7.25")
        page.fill("#a-note", "bank transfer 991")
        page.click("form[data-testid=adjust] button[type=submit]")
        page.wait_for_url("**?ok=saved")
        assert page.locator("[data-testid=user-balance]").inner_text().endswith("7.25")
        assert "bank transfer 991" in page.locator("[data-testid=topup-row]").first.inner_text()
        # Channels: add one, test a configured one (one real request to the mock upstream).
        page.goto(site.url + "/admin/channels")
        name = f"ch-{secrets.token_hex(3)}"
        page.fill("#c-name", name)
        page.fill("#c-url", f"http://127.0.0.1:{site.h.mock.port}/v1")
        page.fill("#c-env", "TOLLWAY_TEST_UPSTREAM_KEY")
        page.fill("#c-models", "gpt-browser")
        page.click("form[data-testid=channel-create] button[type=submit]")
        page.wait_for_url(f"**/admin/channels/{name}?ok=saved")
        page.goto(site.url + "/admin/channels/mock-openai")
        page.fill("#t-model", "gpt-4o-mini")
        page.click("form[data-testid=channel-test] button[type=submit]")
        page.wait_for_selector("[data-testid=test-result]")
        assert page.locator("[data-testid=test-status]").inner_text() == "200"
        # Prices: a change now and one scheduled for tomorrow; the versions and their diff.
        page.goto(site.url + "/admin/prices")
        model = f"m-{secrets.token_hex(3)}"
        for inp in ("1", "1.25"):
            page.fill("#p-model", model)
            page.fill("#p-input", inp)
            page.fill("#p-output", "2")
            page.click("form[data-testid=price-set] button[type=submit]")
            page.wait_for_url("**/admin/prices?ok=saved")
        page.fill("#p-model", model)
        page.fill("#p-input", "9")
        page.fill("#p-output", "9")
        page.fill("#p-at", (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S"))
        page.click("form[data-testid=price-set] button[type=submit]")
        page.wait_for_url("**/admin/prices?ok=saved")
        assert page.locator(f"[data-testid=scheduled-row]:has-text('{model}')").count() == 1
        page.goto(site.url + f"/admin/prices/{model}")
        assert "25" in page.locator("[data-testid=price-diff]").inner_text()
        # Codes: a batch, shown once.
        page.goto(site.url + "/admin/codes")
        page.fill("#c-amount", "3")
        page.fill("#c-count", "4")
        page.click("form[data-testid=codes-create] button.primary")
        page.wait_for_selector("[data-testid=codes-made]")
        made = page.locator("[data-testid=codes-made] pre").inner_text().split()
        assert len(made) == 4 and all(c.startswith("TW-") for c in made)
        # Plans: a new plan.
        page.goto(site.url + "/admin/plans")
        plan = f"Plan {secrets.token_hex(2)}"
        page.fill("#pl-name", plan)
        page.fill("#pl-price", "5")
        page.fill("#pl-credit", "8")
        page.click("form[data-testid=plan-create] button[type=submit]")
        page.wait_for_url(re.compile(r".*/admin/plans/\d+\?ok=saved"))
        # Announcements: published, then seen by the key holder with the unread mark.
        page.goto(site.url + "/admin/announcements")
        title = f"Notice {secrets.token_hex(2)}"
        page.fill("#a-title", title)
        page.fill("#a-body", "New models **today**.")
        page.click("form[data-testid=announcement-create] button[type=submit]")
        page.wait_for_url("**/admin/announcements?ok=saved")
        # Settings: saved and audited.
        page.goto(site.url + "/admin/settings")
        page.fill("#s-min", "1.00")
        page.click("form[data-testid=settings] button[type=submit]")
        page.wait_for_url("**/admin/settings?ok=saved")
        page.goto(site.url + "/admin/audit?action=settings.set")
        assert page.locator("[data-testid=audit-row]").count() >= 1
        page.goto(site.url + "/admin/settings")
        page.fill("#s-min", "0.01")
        page.click("form[data-testid=settings] button[type=submit]")
        page.wait_for_url("**/admin/settings?ok=saved")
        # Every page: no serious or critical axe finding; screenshots when asked.
        for label, path in ADMIN_PAGES:
            page.goto(site.url + path.format(user=user_id))
            if label == "overview":
                page.wait_for_selector(".chart canvas")
            _ok(page)
            violations = _axe(page)
            assert not violations, (lang, label, violations)
            _shoot(page, f"{lang}-admin-{label}")
        assert page.get_attribute("html", "lang") == ("zh-Hans" if lang == ZH else "en")
    finally:
        ctx.close()


def test_a_viewer_sees_every_page_and_no_form_that_changes_anything(site: Site, browser: Any) -> None:
    ctx = browser.new_context()
    try:
        page, uid = operator_login(site, ctx, "viewer")
        for label, path in ADMIN_PAGES:
            page.goto(site.url + path.format(user=uid))
            _ok(page)
            assert page.locator("[data-testid=read-only]").is_visible(), label
            forms = page.locator("main form[method=post]")
            assert forms.count() == 0 or all(
                forms.nth(i).locator("button[type=submit]").count() == 0 for i in range(forms.count())
            ), label
        _shoot(page, "en-admin-viewer")
    finally:
        ctx.close()


def test_a_user_reaches_no_operator_page(site: Site, browser: Any) -> None:
    ctx = browser.new_context()
    try:
        page, uid = operator_login(site, ctx, "user")
        for _, path in ADMIN_PAGES:
            resp = page.goto(site.url + path.format(user=uid))
            assert resp is not None and resp.status == 403, path
        assert page.locator("a[href='/admin']").count() == 0
    finally:
        ctx.close()


@pytest.mark.parametrize("lang", ["en", ZH])
def test_a_ticket_from_a_log_row_is_answered_and_seen(site: Site, browser: Any, lang: str) -> None:
    holder_ctx = browser.new_context(locale="zh-CN" if lang == ZH else "en-US", bypass_csp=True)
    admin_ctx = browser.new_context()
    try:
        page = holder_ctx.new_page()
        email = _email()
        sign_up(site, page, email, lang=lang)
        site.run(_fund(site, email))
        page.goto(site.url + "/console/keys")
        page.fill("form[data-testid=key-create] input[name=name]", "support")
        page.click("form[data-testid=key-create] button[type=submit]")
        secret = page.locator("[data-testid=key-secret]").inner_text().strip()
        import openai

        client = openai.OpenAI(base_url=site.url + "/v1", api_key=secret, max_retries=0)
        raw = _eventually(lambda: client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]))
        rid = raw.headers["x-request-id"]
        site.flush()
        row = page.locator(f"[data-testid=log-row][data-request-id='{rid}']")
        deadline = time.monotonic() + 15  # the ledger reaches Postgres on its own clock
        while True:
            page.goto(site.url + "/console/logs")
            if row.count() == 1 or time.monotonic() > deadline:
                break
            page.wait_for_timeout(200)
        row.locator("a").click()
        page.wait_for_url(f"**/console/logs/{rid}")
        page.click("[data-testid=ask-support]")
        assert page.locator("[data-testid=ticket-request-id]").inner_text() == rid
        subject = "账单疑问" if lang == ZH else "A question about a bill"
        page.fill("#t-subject", subject)
        page.fill("#t-body", "这个请求收费对吗？" if lang == ZH else "Was this charged right?")
        page.click("form[data-testid=ticket-open] button[type=submit]")
        page.wait_for_url(re.compile(r".*/console/tickets/\d+\?ok=ticket_sent"))
        ticket_url = page.url.split("?")[0]
        _shoot(page, f"{lang}-ticket-opened")

        admin, _ = operator_login(site, admin_ctx, "admin", lang)
        admin.goto(site.url + "/admin/tickets")
        admin.locator(f"[data-testid=ticket-row]:has-text('{subject}') a").first.click()
        assert admin.locator("[data-testid=ticket-request]").inner_text() == rid
        answer = "已核实，只收费一次。" if lang == ZH else "Checked: charged once."
        admin.fill("#r-body", answer)
        admin.click("form[data-testid=ticket-reply] button[type=submit]")
        admin.wait_for_url("**?ok=ticket_sent")
        assert admin.locator("[data-testid=message]").count() == 2
        _shoot(admin, f"{lang}-admin-ticket")

        page.goto(ticket_url)
        staff = page.locator("[data-testid=message][data-staff=yes]")
        assert staff.count() == 1 and answer in staff.inner_text()
        assert page.locator("[data-testid=ticket-state]").inner_text() == (
            "客服已回复" if lang == ZH else "support answered")
        _shoot(page, f"{lang}-ticket-answered")
        assert not _axe(page), _axe(page)
        page.goto(site.url + "/console/tickets")
        assert not _axe(page), _axe(page)
    finally:
        holder_ctx.close()
        admin_ctx.close()

