"""The console in a real browser: sign-up with and without an invite, verification,
login, 2FA, the device limit, CSRF refusal, every page in both languages at desktop
width and at 375 px, an axe accessibility scan, and the clicks from sign-up to a key
whose snippets work (counted, at most 12)."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any

import pyotp
import pytest

from tests.browser.site import Site

AXE = Path(__file__).with_name("axe.min.js")
SHOTS = Path(__file__).resolve().parents[2] / "deploy" / "screenshots"
PASSWORD = "a browser password"
ZH = "zh_Hans"


class Clicks:
    def __init__(self, page: Any) -> None:
        self.page = page
        self.n = 0

    def click(self, selector: str) -> None:
        self.n += 1
        self.page.click(selector)


def _email() -> str:
    return f"b{secrets.token_hex(5)}@example.com"


def sign_up(site: Site, page: Any, email: str, *, invite_link: str = "", lang: str = "en",
            clicks: Clicks | None = None) -> Clicks:
    c = clicks or Clicks(page)
    if invite_link:
        page.goto(invite_link + ("&lang=" + lang))
    else:
        page.goto(site.url + f"/?lang={lang}")  # the site's address, as a user has it
        c.click("main a[href='/console/register']")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    c.click("form[data-testid=register] button[type=submit]")
    page.wait_for_url("**/console/verify")
    page.fill("#code", site.code_for(email))
    c.click("form[data-testid=verify] button[type=submit]")
    page.wait_for_url("**/console?ok=verified")
    return c


def log_in(site: Site, page: Any, email: str) -> None:
    page.goto(site.url + "/console/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("form[data-testid=login] button[type=submit]")


@pytest.mark.parametrize("lang", ["en", ZH])
def test_from_sign_up_to_a_working_key_in_at_most_12_clicks(site: Site, context: Any, lang: str) -> None:
    page = context.new_page()
    email = _email()
    c = sign_up(site, page, email, lang=lang)
    assert page.locator("[data-testid=balance]").inner_text().startswith("$")
    if lang == ZH:
        assert "余额" in page.content()
        c.click("a.button.primary[href='/console/keys']")
    else:
        c.click("text=Create an API key")
    page.fill("form[data-testid=key-create] input[name=name]", "my laptop")
    c.click("form[data-testid=key-create] button[type=submit]")
    secret = page.locator("[data-testid=key-secret]").inner_text().strip()
    assert secret.startswith("sk-")
    assert c.n <= 12, c.n
    # The snippets, as shown, reach the gateway: Claude Code's variables (no /v1) with the
    # Anthropic SDK, Codex's provider (base URL with /v1, Responses API) with the OpenAI SDK.
    claude = page.locator("#snippet-claude").inner_text()
    env = dict(re.findall(r"export (\w+)=(\S+)", claude))
    assert env["ANTHROPIC_BASE_URL"] == site.url and env["ANTHROPIC_AUTH_TOKEN"] == secret
    codex = page.locator("#snippet-codex").inner_text()
    base = re.search(r'base_url = "([^"]+)"', codex).group(1)
    assert base == site.url + "/v1" and 'wire_api = "responses"' in codex
    site.run(_fund(site, email))
    import anthropic
    import openai

    msg = _eventually(lambda: anthropic.Anthropic(base_url=env["ANTHROPIC_BASE_URL"], auth_token=secret, api_key=None,
                              max_retries=0).messages.create(
        model=env.get("ANTHROPIC_MODEL", "claude-sonnet-4-6"), max_tokens=32,
        messages=[{"role": "user", "content": "hi"}]))
    assert msg.content
    resp = openai.OpenAI(base_url=base, api_key=secret, max_retries=0).responses.create(
        model=re.search(r'^model = "([^"]+)"', codex, re.M).group(1), input="hi")
    assert resp.output


def _eventually(call: Any) -> Any:
    """A new balance reaches the gateway's cache within its poll (about half a second):
    retry a 402 for a bounded time."""
    import time

    import anthropic
    import openai

    deadline = time.monotonic() + 10
    while True:
        try:
            return call()
        except (anthropic.APIStatusError, openai.APIStatusError) as exc:
            if exc.status_code != 402 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


async def _fund(site: Site, email: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(site.h.dsn)
    try:
        await conn.execute("UPDATE users SET balance_nano = balance_nano + 5000000000 WHERE email = $1", email)
    finally:
        await conn.close()


def test_sign_up_with_an_invite_link(site: Site, context: Any) -> None:
    page = context.new_page()
    inviter = _email()
    sign_up(site, page, inviter)
    page.goto(site.url + "/console/invite")
    link = page.locator("[data-testid=invite-link]").inner_text().strip()
    assert "/console/register?aff=INV-" in link
    other = context.browser.new_context()
    try:
        p2 = other.new_page()
        p2.goto(link)
        assert p2.input_value("#invite") == link.split("aff=")[1]
        invitee = _email()
        sign_up(site, p2, invitee, invite_link=link)
    finally:
        other.close()
    page.reload()
    assert page.locator("[data-testid=invitee]").count() == 1
    assert invitee not in page.content()


def test_login_two_factor_and_logout(site: Site, browser: Any) -> None:
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        email = _email()
        sign_up(site, page, email)
        page.goto(site.url + "/console/account")
        secret = page.locator("[data-testid=totp-secret]").inner_text().strip()
        page.fill("#totp-code", pyotp.TOTP(secret).now())
        page.click("form[action='/console/account/2fa/enable'] button")
        assert page.locator("[data-testid=recovery-codes]").is_visible()
        page.click("form.logout button")
        page.wait_for_url("**/console/login?why=logout")
        log_in(site, page, email)
        page.wait_for_url("**/console/login/2fa**")
        page.fill("#code", pyotp.TOTP(secret).now())
        page.click("form[action='/console/login/2fa'] button[type=submit]")
        page.wait_for_url(re.compile(r".*/console$"))
        assert page.locator("[data-testid=balance]").is_visible()
    finally:
        ctx.close()


def test_device_limit_signs_out_the_oldest_with_a_message(site: Site, browser: Any) -> None:
    ctxs = [browser.new_context() for _ in range(3)]
    try:
        pages = [c.new_page() for c in ctxs]
        email = _email()
        sign_up(site, pages[0], email)
        log_in(site, pages[1], email)
        pages[1].wait_for_url(re.compile(r".*/console$"))
        log_in(site, pages[2], email)
        pages[2].wait_for_url(re.compile(r".*/console$"))
        pages[0].goto(site.url + "/console/keys")
        pages[0].wait_for_url("**/console/login**")
        assert "another device" in pages[0].locator("main").inner_text()
        pages[1].goto(site.url + "/console/account")
        assert pages[1].locator("[data-testid=session]").count() == 2
    finally:
        for c in ctxs:
            c.close()


def test_a_forged_csrf_token_is_refused(site: Site, context: Any) -> None:
    page = context.new_page()
    sign_up(site, page, _email())
    page.goto(site.url + "/console/keys")
    page.eval_on_selector("form[data-testid=key-create] input[name=csrf]", "e => e.value = 'forged'")
    page.fill("form[data-testid=key-create] input[name=name]", "nope")
    page.click("form[data-testid=key-create] button[type=submit]")
    assert "403" in page.locator("h1").inner_text()
    page.goto(site.url + "/console/keys")
    assert page.locator("[data-testid=key-row]").count() == 0


PAGES = [("home", "/console"), ("keys", "/console/keys"), ("key", "/console/keys/{key}"),
         ("usage", "/console/usage"), ("logs", "/console/logs"), ("bill", "/console/logs/{rid}"),
         ("wallet", "/console/wallet"), ("plans", "/console/plans"), ("health", "/console/health"),
         ("invite", "/console/invite"), ("account", "/console/account"),
         ("devices", "/console/account/devices"), ("pricing", "/pricing"),
         ("status", "/status")]
PUBLIC = [("login", "/console/login"), ("register", "/console/register")]


def _axe(page: Any) -> list[dict[str, Any]]:
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return [{"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]}
            for v in result["violations"] if v["impact"] in ("serious", "critical")]


@pytest.mark.parametrize("lang", ["en", ZH])
def test_every_page_in_both_languages_at_desktop_and_375px_with_axe(site: Site, browser: Any, lang: str) -> None:
    shoot = os.environ.get("TOLLWAY_SCREENSHOTS") == "1"
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # axe is injected
    try:
        page = ctx.new_page()
        for name, path in PUBLIC:
            page.goto(site.url + path + f"?lang={lang}")
            assert not _axe(page), (lang, name, _axe(page))
            if shoot:
                page.screenshot(path=str(SHOTS / f"{lang}-{name}.png"), full_page=True)
        email = _email()
        sign_up(site, page, email, lang=lang)
        site.run(_fund(site, email))
        page.goto(site.url + "/console/keys")
        page.fill("form[data-testid=key-create] input[name=name]", "laptop")
        page.fill("form[data-testid=key-create] input[name=cap]", "20")
        page.click("form[data-testid=key-create] button[type=submit]")
        secret = page.locator("[data-testid=key-secret]").inner_text().strip()
        key_id = page.locator("[data-testid=key-row]").first.get_attribute("data-key-id")
        if shoot:
            page.screenshot(path=str(SHOTS / f"{lang}-key-created.png"), full_page=True)
        import openai
        client = openai.OpenAI(base_url=site.url + "/v1", api_key=secret, max_retries=0)
        # The funds reach the gateway's cache on its next poll, so a first call may be
        # refused (402) and retried; a refused call is a row of the log too (status 402).
        # Count the calls that answered, by their request ids, not the rows.
        answered = []
        for model in ("gpt-4o-mini", "gpt-4o-mini", "claude-sonnet-4-6"):
            raw = _eventually(lambda m=model: client.chat.completions.with_raw_response.create(
                model=m, messages=[{"role": "user", "content": "hi"}]))
            answered.append(raw.headers["x-request-id"])
        site.flush()
        import time
        deadline = time.monotonic() + 15  # the ledger's flush reaches Postgres on its own clock
        while True:
            page.goto(site.url + "/console/logs")
            rows = page.locator("[data-testid=log-row]")
            shown = [rows.nth(i).get_attribute("data-request-id") for i in range(rows.count())]
            if set(answered) <= set(shown) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert set(answered) <= set(shown), (answered, shown)
        rid = answered[-1]
        row = page.locator(f"[data-testid=log-row][data-request-id='{rid}']")
        assert row.locator("td").last.inner_text().strip() == "200"
        row.locator("a").click()
        page.wait_for_url(f"**/console/logs/{rid}")
        assert page.locator("[data-testid=bill]").is_visible()
        for name, path in PAGES:
            page.goto(site.url + path.format(key=key_id, rid=rid))
            if name in ("home", "usage"):
                page.wait_for_selector(".chart canvas")
                # Ticks a few nano-dollars apart read apart (not "$0.0000" four times).
                ticks = page.evaluate("() => TollwayConsole.moneyTicks(document.documentElement.lang,"
                                      " [0, 0.0000005, 0.000001, 0.0000015])")
                assert len(set(ticks)) == 4, ticks
            if name == "usage":
                assert page.locator("[data-testid=csv]").count() == 1
            if name in ("account", "devices"):
                assert page.locator("[data-testid=session]").count() >= 1
            violations = _axe(page)
            assert not violations, (lang, name, violations)
            if shoot:
                page.screenshot(path=str(SHOTS / f"{lang}-{name}.png"), full_page=True)
        html_lang = page.get_attribute("html", "lang")
        assert html_lang == ("zh-Hans" if lang == ZH else "en")
        # 375 px: every page fits the width (wide tables scroll inside their card).
        page.set_viewport_size({"width": 375, "height": 800})
        for name, path in PAGES:
            page.goto(site.url + path.format(key=key_id, rid=rid))
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 376, (lang, name, width)
            if shoot and name in ("home", "keys", "usage", "account", "devices"):
                page.screenshot(path=str(SHOTS / f"{lang}-{name}-375.png"), full_page=True)
    finally:
        ctx.close()
