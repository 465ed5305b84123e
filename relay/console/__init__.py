"""The key holder's console: server-rendered pages under /console, plus /pricing and /status.

`build(gw, worker)` returns the object the gateway dispatches to after every model route
(relay.app.Gateway.handle tries `gw.apis` only when no model route matched), so nothing
here costs the model path anything. The pages call the same accounting functions as the
admin API and the CLI (one code path per action); this package only renders them.

    web.py       routing, sessions from cookies, CSRF and Origin checks
    auth.py      sign-up, verification, login, 2FA, logout, reset, setup links
    home.py      home and account (password, 2FA, devices, language, time zone)
    keys.py      keys: create, edit, disable, enable, reset, delete, snippets
    usage.py     usage curve and table, request logs and bills, group health, CSV
    wallet.py    wallet (redeem, transfer, history), plans, invite
    public.py    /pricing and /status
    tickets.py   support tickets, the key holder's side
    admin/       the operator's pages under /admin (roles checked by web.Router)
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from accounting import accounts, growth
from relay.console.alerts import LowBalanceAlerts
from relay.console.i18n import LANGS, Languages, best_lang
from relay.console.mail import Mailer
from relay.console.static import Static
from relay.console.throttle import Throttle
from relay.console.web import LANG_COOKIE, Page, Refused, Response, Router, redirect
from relay.httpserver import HttpConnection, Request

log = logging.getLogger("tollway.console")

WHY = {
    "device_limit": "You were signed out because your account signed in on another device "
                    "(at most {n} devices at once).",
    "password": "You were signed out because the password was changed.",
    "2fa": "You were signed out because two-factor authentication was changed.",
    "revoked": "This session was signed out from another device.",
    "expired": "Your session has expired. Sign in again.",
    "logout": "You are signed out.",
    "disabled": "This account is disabled.",
    "reset": "Your password was changed. Sign in with the new one.",
}


# Messages a redirect may carry (?ok=... / ?err=...): codes, never free text.
FLASH = {
    "saved": "Saved.",
    "password": "Your password was changed. Your other sessions were signed out.",
    "verified": "Your email is verified.",
    "sent": "We sent a new code.",
    "revoked": "The session was signed out.",
    "2fa_on": "Two-factor authentication is on.",
    "2fa_off": "Two-factor authentication is off.",
    "key_saved": "The key was saved.",
    "key_disabled": "The key was disabled.",
    "key_enabled": "The key was enabled.",
    "key_deleted": "The key was deleted.",
    "redeemed": "The code was redeemed.",
    "sent_money": "The transfer was made.",
    "bought": "The plan is yours.",
    "renewed": "The plan was renewed.",
    "reset_sent": "If an account exists for this email, we sent it a code.",
    "need_2fa": "Operators sign in with two-factor authentication: turn it on below to reach the"
                " operator pages.",
    "ticket_sent": "Your message was sent.",
    "done": "Done.",
}


class Console:
    def __init__(self, gw: Any, worker: Any = None) -> None:
        self.gw = gw
        self.worker = worker
        from relay.ops.settings import Live

        self.settings = Live(gw.cfg)
        self._terms: growth.Terms | None = None
        self.has_owner = False  # once true, the login page stops asking (no query)
        gw.settings = self.settings  # the admin API's actions read the same live settings
        self.static = Static()
        self.langs = Languages(self.static)
        a = self.cfg
        self.passwords = accounts.Passwords(time_cost=a.argon2_time_cost,
                                            memory_kib=a.argon2_memory_kib,
                                            threads=a.argon2_threads)
        # Under the deployment's Redis prefix (limits.namespace), read by the limiter at
        # start: two deployments sharing a Redis never count each other's attempts.
        shared = getattr(getattr(gw, "limiter", None), "shared", None)
        self.throttle = Throttle(a.attempts_per_ip, a.attempts_per_account, a.attempts_window_s,
                                 gw.cfg.limits.redis_url,
                                 prefix=getattr(shared, "prefix", None) or "tollway:")
        self.mailer = Mailer(a)
        self.alerts = LowBalanceAlerts(self, a.low_balance_check_s)
        self.router = Router(self)
        self.settings.listeners.append(self._settings_changed)
        from relay.console import admin, auth, devices, home, keys, public, tickets, usage, wallet

        for module in (auth, home, devices, keys, usage, wallet, public, tickets, admin):
            module.routes(self)

    @property
    def cfg(self) -> Any:
        """[accounts] with the operator's live settings over it."""
        return self.settings.accounts

    @property
    def terms(self) -> growth.Terms:
        if self._terms is not None:
            return self._terms
        return self.settings.growth()

    @terms.setter
    def terms(self, value: growth.Terms) -> None:
        """Fixed terms, over the settings (tests)."""
        self._terms = value

    def _settings_changed(self, live: Any) -> None:
        self.mailer.cfg = live.accounts

    @property
    def db(self) -> Any:
        return self.gw.db

    # --- the gateway's Api interface ---------------------------------------------------

    async def aclose(self) -> None:
        """Stop the background task and close the throttle's Redis (the worker's stop)."""
        await self.alerts.stop()
        await self.throttle.close()

    def matches(self, path: bytes) -> bool:
        # /admin/v1/ is the JSON admin API's (relay.admin, tried before this).
        return path == b"/" or path.startswith((b"/console", b"/admin")) or path in (
            b"/pricing", b"/status", b"/login", b"/register")

    async def dispatch(self, req: Request, conn: HttpConnection, rid: bytes) -> None:
        try:
            await self.settings.refresh(self.db)
        except Exception as exc:  # Postgres away: keep the last settings seen
            log.warning("settings refresh failed: %s", exc)
        await self.router.dispatch(req, conn, rid)

    # --- rendering ---------------------------------------------------------------------

    def pick_lang(self, page: Page) -> None:
        if page.account is not None and page.account.lang in LANGS:
            page.lang = page.account.lang
            return
        chosen = page.query.get("lang") or page.cookies.get(LANG_COOKIE)
        if chosen in LANGS:
            page.lang = chosen
        else:
            page.lang = best_lang((page.req.header(b"accept-language") or b"").decode("latin-1"))

    def _(self, page: Page, message: str) -> str:
        return self.langs.gettext(page.lang, message)

    def render(self, page: Page, template: str, status: int = 200, **ctx: Any) -> Response:
        env = self.langs.envs[page.lang]
        nav = page.account is not None and page.session is not None and not page.session.mfa_pending
        body = env.get_template(template).render(
            page=page, account=page.account if nav else None, csrf=page.csrf, tz=page.tz,
            site=self.cfg.site_name, path=page.path, flash=self.flash(page), **ctx)
        return Response(status, body.encode())

    def flash(self, page: Page) -> str:
        code = page.query.get("ok", "")
        return self._(page, FLASH[code]) if code in FLASH else ""

    def refusal(self, exc: Refused) -> Response:
        """The error page, in the page's language when it was known (messages raised in
        English are translated here; a message already translated passes unchanged)."""
        lang = exc.lang if exc.lang in self.langs.envs else "en"
        env = self.langs.envs[lang]
        body = env.get_template("error.html").render(
            page=None, account=None, csrf="", tz="UTC", site=self.cfg.site_name, path="", flash="",
            status=exc.status, message=self.langs.gettext(lang, str(exc)))
        resp = Response(exc.status, body.encode())
        if exc.retry_after:
            resp.headers.append((b"retry-after", str(exc.retry_after).encode()))
        return resp

    def why(self, page: Page, why: str) -> str:
        text = WHY.get(why)
        if text is None:
            return ""
        return self._(page, text).format(n=self.cfg.max_devices)

    # --- shared helpers ------------------------------------------------------------------

    def base_url(self, page: Page) -> str:
        if self.cfg.public_url:
            return self.cfg.public_url.rstrip("/")
        return f"{'https' if page.secure else 'http'}://{page.host or '127.0.0.1'}"

    async def throttled(self, page: Page, action: str, account: str = "") -> None:
        wait = await self.throttle.hit(action, page.ip, account)
        if wait:
            raise Refused(429, self._(page, "Too many attempts. Wait a few minutes and try again."),
                          retry_after=wait)

    def now(self) -> datetime:
        return datetime.now(UTC)

    def zone(self, page: Page) -> ZoneInfo:
        try:
            return ZoneInfo(page.tz)
        except Exception:
            return ZoneInfo("UTC")

    def devices(self, account: accounts.Account) -> int:
        return account.max_devices or self.cfg.max_devices


def back(to: str, **flash: str) -> Response:
    """Redirect after a form (post/redirect/get) with a short message in the query."""
    from urllib.parse import urlencode

    q = urlencode({k: v for k, v in flash.items() if v})
    return redirect(f"{to}{'&' if '?' in to else '?'}{q}" if q else to)


def build(gw: Any, worker: Any = None) -> Console:
    c = Console(gw, worker)
    # One sender per host is enough (each crossing is claimed once across hosts anyway);
    # worker 0 of each host runs it, off the request path.
    if worker is not None and getattr(worker, "index", 0) == 0:
        c.alerts.start()
    return c
