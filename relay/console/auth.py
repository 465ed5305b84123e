"""Sign-up, email verification, login (with the second factor), logout, password reset
and setup links.

Every login issues a new token (no session fixation) and ends the browser's previous
session; the device limit signs out the oldest session and never refuses a login. Wrong
email and wrong password read the same and cost the same time. Each action is throttled
per address and per account.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

from accounting import accounts, sessions, store
from accounting.accounts import AccountError
from accounting.store import Conflict, StoreError
from relay.console.web import MFA, PUBLIC, USER, Page, Response, redirect

ACCOUNT_ERRORS = (AccountError, Conflict, StoreError)


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/", lambda p: _to_console(p), PUBLIC)
    r.add("GET", "/login", lambda p: _to_console(p, "/console/login"), PUBLIC)
    r.add("GET", "/register", lambda p: _to_console(p, "/console/register"), PUBLIC)
    r.add("GET", "/console/register", lambda p: register_form(c, p), PUBLIC)
    r.add("POST", "/console/register", lambda p: register(c, p), PUBLIC)
    r.add("GET", "/console/verify", lambda p: verify_form(c, p), USER)
    r.add("POST", "/console/verify", lambda p: verify(c, p), USER)
    r.add("POST", "/console/verify/resend", lambda p: resend(c, p), USER)
    r.add("GET", "/console/login", lambda p: login_form(c, p), PUBLIC)
    r.add("POST", "/console/login", lambda p: login(c, p), PUBLIC)
    r.add("GET", "/console/login/2fa", lambda p: mfa_form(c, p), MFA)
    r.add("POST", "/console/login/2fa", lambda p: mfa(c, p), MFA)
    r.add("POST", "/console/logout", lambda p: logout(c, p), MFA)
    r.add("GET", "/console/reset", lambda p: reset_form(c, p), PUBLIC)
    r.add("POST", "/console/reset", lambda p: reset_send(c, p), PUBLIC)
    r.add("GET", "/console/reset/confirm", lambda p: reset_confirm_form(c, p), PUBLIC)
    r.add("POST", "/console/reset/confirm", lambda p: reset_confirm(c, p), PUBLIC)
    r.add("GET", "/console/setup", lambda p: setup_form(c, p), PUBLIC)
    r.add("POST", "/console/setup", lambda p: setup(c, p), PUBLIC)
    # The link `tollway users create` prints: the same one-time set-up page.
    r.add("GET", "/console/set-password", lambda p: setup_form(c, p), PUBLIC)
    r.add("POST", "/console/set-password", lambda p: setup(c, p), PUBLIC)
    r.add("GET", "/console/setup-owner", lambda p: owner_form(c, p), PUBLIC)
    r.add("POST", "/console/setup-owner", lambda p: owner_setup(c, p), PUBLIC)


async def _to_console(p: Page, to: str = "/console") -> Response:
    q = p.req.query.decode("latin-1")
    return redirect(f"{to}?{q}" if q else to, 302)


def _safe_next(target: str) -> str:
    """Only this site's console pages: never an absolute or scheme-relative URL."""
    if target.startswith(("/console", "/admin")) and not target.startswith("//") \
            and "\\" not in target:
        return target
    return "/console"


async def start_session(c: Any, p: Page, user_id: int, *, mfa: bool, to: str) -> Response:
    """A new session (new token) for this browser; the browser's old one ends."""
    max_devices = c.cfg.max_devices
    async with c.db.acquire() as conn:
        acct = await accounts.get(conn, user_id)
        if acct is not None:
            max_devices = c.devices(acct)
        if p.session is not None:
            await sessions.end(conn, p.session.id, "logout")
        token, _, _ = await sessions.create(
            conn, user_id, ip=p.ip, user_agent=p.user_agent, max_devices=max_devices,
            absolute=timedelta(seconds=c.cfg.session_max_s), mfa_pending=mfa)
    resp = redirect("/console/login/2fa?next=" + quote(to, safe="") if mfa else to)
    resp.cookie(p.cookie_name, token, secure=p.secure, max_age=c.cfg.session_max_s)
    return resp


# --- sign-up -------------------------------------------------------------------------------


async def register_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    if p.session is not None and not p.session.mfa_pending:
        return redirect("/console")
    invite = p.form.get("invite") or p.query.get("aff") or p.query.get("invite") or ""
    return c.render(p, "register.html", status, mode=c.cfg.signup, error=error,
                    email=p.form.get("email", ""), invite=invite)


async def register(c: Any, p: Page) -> Response:
    if c.cfg.signup == "closed":
        return await register_form(c, p, c._(p, "Sign-up is closed on this site."), 403)
    email = p.form.get("email", "").strip()
    await c.throttled(p, "signup", email)
    password = p.form.get("password", "")
    invite = p.form.get("invite", "").strip()
    try:
        email = accounts.normalize_email(email)
        accounts.check_password(password)
        if c.cfg.signup == "invite" and not invite:
            raise AccountError("An invite code is required to sign up here")
        async with c.db.acquire() as conn:
            if invite:
                invite = await accounts.check_invite(conn, invite)
        hashed = await c.passwords.hash(password)
        async with c.db.acquire() as conn:
            uid = await accounts.register(conn, email, hashed, invite=invite or None,
                                          verified=not c.cfg.verify_email, lang=p.lang)
            if c.cfg.verify_email:
                code = await accounts.new_code(conn, uid, "verify")
            else:
                await accounts.grant_credits(conn, uid, c.terms)
    except ACCOUNT_ERRORS as exc:
        return await register_form(c, p, c._(p, str(exc)), 400)
    if c.cfg.verify_email:
        await _send_code(c, p, email, code, "verify")
        return await start_session(c, p, uid, mfa=False, to="/console/verify")
    return await start_session(c, p, uid, mfa=False, to="/console?welcome=1")


async def _send_code(c: Any, p: Page, email: str, code: str, purpose: str) -> None:
    if purpose == "verify":
        subject = c._(p, "Your verification code")
        body = c._(p, "Your verification code is {code}. It is valid for 30 minutes.")
    else:
        subject = c._(p, "Your password reset code")
        body = c._(p, "Your password reset code is {code}. It is valid for 30 minutes. "
                      "If you did not ask for it, ignore this email.")
    await c.mailer.send(email, f"{c.cfg.site_name}: {subject}", body.format(code=code))


async def verify_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    assert p.account is not None
    if p.account.email_verified:
        return redirect("/console")
    return c.render(p, "verify.html", status, error=error, smtp=bool(c.cfg.smtp_host))


async def verify(c: Any, p: Page) -> Response:
    assert p.account is not None
    await c.throttled(p, "verify", str(p.user_id))
    try:
        async with c.db.acquire() as conn:
            await accounts.use_code(conn, p.user_id, "verify", p.form.get("code", ""))
            await accounts.mark_verified(conn, p.user_id)
            await accounts.grant_credits(conn, p.user_id, c.terms)
    except AccountError as exc:
        return await verify_form(c, p, c._(p, str(exc)), 400)
    return redirect("/console?ok=verified")


async def resend(c: Any, p: Page) -> Response:
    assert p.account is not None and p.account.email
    await c.throttled(p, "verify-send", str(p.user_id))
    async with c.db.acquire() as conn:
        code = await accounts.new_code(conn, p.user_id, "verify")
    await _send_code(c, p, p.account.email, code, "verify")
    return redirect("/console/verify?ok=sent")


# --- login -----------------------------------------------------------------------------------


async def login_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    if p.session is not None and not p.session.mfa_pending:
        return redirect(_safe_next(p.query.get("next", "/console")))
    notice = c.why(p, p.query.get("why", "") or p.ended)
    if not notice and not c.has_owner:
        async with c.db.acquire() as conn:
            c.has_owner = await accounts.owner_exists(conn)
        if not c.has_owner:
            notice = c._(p, "This site has no owner yet: open the one-time set-up link the"
                            " gateway printed when it started.")
    return c.render(p, "login.html", status, error=error, notice=notice,
                    email=p.form.get("email", ""), next=_safe_next(p.query.get("next", "/console")),
                    signup=c.cfg.signup)


async def login(c: Any, p: Page) -> Response:
    email = p.form.get("email", "").strip()
    await c.throttled(p, "login", email)
    password = p.form.get("password", "")[: accounts.MAX_PASSWORD]
    async with c.db.acquire() as conn:
        acct = await accounts.by_email(conn, email) if email else None
        stored = await accounts.password_hash(conn, acct.id) if acct is not None else None
    ok, rehash = await c.passwords.verify(stored, password)
    if not ok or acct is None or acct.status != "active":
        return await login_form(c, p, c._(p, "The email or the password is not right."), 400)
    if rehash:
        new_hash = await c.passwords.hash(password)
        async with c.db.acquire() as conn:
            await accounts.set_password(conn, acct.id, new_hash)
    return await start_session(c, p, acct.id, mfa=acct.totp_enabled,
                               to=_safe_next(p.form.get("next", "/console")))


async def mfa_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    assert p.session is not None
    if not p.session.mfa_pending:
        return redirect("/console")
    return c.render(p, "mfa.html", status, error=error,
                    next=_safe_next(p.query.get("next", "/console")))


async def mfa(c: Any, p: Page) -> Response:
    assert p.session is not None
    if not p.session.mfa_pending:
        return redirect("/console")
    await c.throttled(p, "2fa", str(p.session.user_id))
    async with c.db.acquire() as conn:
        ok = await accounts.second_factor_ok(conn, p.session.user_id, p.form.get("code", ""))
        if not ok:
            return await mfa_form(c, p, c._(p, "The code is not right"), 400)
        acct = await accounts.get(conn, p.session.user_id)
        token, _ = await sessions.promote(conn, p.session,
                                          c.devices(acct) if acct else c.cfg.max_devices)
    resp = redirect(_safe_next(p.form.get("next", "/console")))
    resp.cookie(p.cookie_name, token, secure=p.secure, max_age=c.cfg.session_max_s)
    return resp


async def logout(c: Any, p: Page) -> Response:
    assert p.session is not None
    async with c.db.acquire() as conn:
        await sessions.end(conn, p.session.id, "logout")
    resp = redirect("/console/login?why=logout")
    resp.cookie(p.cookie_name, "", max_age=0, secure=p.secure)
    return resp


# --- password reset and setup links ------------------------------------------------------------


async def reset_form(c: Any, p: Page) -> Response:
    return c.render(p, "reset.html", email=p.query.get("email", ""))


async def reset_send(c: Any, p: Page) -> Response:
    email = p.form.get("email", "").strip()
    await c.throttled(p, "reset", email)
    async with c.db.acquire() as conn:
        acct = await accounts.by_email(conn, email) if email else None
        code = None
        if acct is not None and acct.status == "active":
            code = await accounts.new_code(conn, acct.id, "reset")
    if code is not None and acct is not None and acct.email:
        await _send_code(c, p, acct.email, code, "reset")
    return redirect("/console/reset/confirm?ok=reset_sent&email=" + quote(email, safe=""))


async def reset_confirm_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    return c.render(p, "reset_confirm.html", status, error=error,
                    email=p.form.get("email") or p.query.get("email", ""))


async def reset_confirm(c: Any, p: Page) -> Response:
    email = p.form.get("email", "").strip()
    await c.throttled(p, "reset-confirm", email)
    try:
        accounts.check_password(p.form.get("password", ""))
        async with c.db.acquire() as conn:
            acct = await accounts.by_email(conn, email) if email else None
            if acct is None:
                raise AccountError("The code is not right")
            await accounts.use_code(conn, acct.id, "reset", p.form.get("code", ""))
        hashed = await c.passwords.hash(p.form["password"])
        async with c.db.acquire() as conn:
            await accounts.set_password(conn, acct.id, hashed)
            await sessions.end_others(conn, acct.id, None, "password")
    except AccountError as exc:
        return await reset_confirm_form(c, p, c._(p, str(exc)), 400)
    return redirect("/console/login?why=reset")


async def setup_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    token = p.form.get("token") or p.query.get("token", "")
    async with c.db.acquire() as conn:
        uid = await accounts.user_of_setup_token(conn, token) if token else None
        acct = await accounts.get(conn, uid) if uid is not None else None
    if acct is None:
        return c.render(p, "setup.html", 400, token="", error=c._(p, "This link has expired."),
                        email="")
    return c.render(p, "setup.html", status, token=token, error=error,
                    email=p.form.get("email") or acct.email or "")


async def setup(c: Any, p: Page) -> Response:
    token = p.form.get("token", "")
    await c.throttled(p, "setup", token[:12])
    try:
        accounts.check_password(p.form.get("password", ""))
        async with c.db.acquire() as conn:
            uid = await accounts.user_of_setup_token(conn, token) if token else None
            if uid is None:
                raise AccountError("This link has expired.")
            acct = await accounts.get(conn, uid)
            assert acct is not None
            if not acct.email:
                await accounts.set_login(conn, uid, p.form.get("email", ""))
            await accounts.use_code(conn, uid, "setup", token)
        hashed = await c.passwords.hash(p.form["password"])
        async with c.db.acquire() as conn:
            await accounts.set_password(conn, uid, hashed)
            await sessions.end_others(conn, uid, None, "password")
    except ACCOUNT_ERRORS as exc:
        return await setup_form(c, p, c._(p, str(exc)), 400)
    return await start_session(c, p, uid, mfa=False, to="/console")


# --- the first owner -----------------------------------------------------------------------


async def owner_form(c: Any, p: Page, error: str = "", status: int = 200) -> Response:
    token = p.form.get("token") or p.query.get("token", "")
    async with c.db.acquire() as conn:
        ok = await accounts.owner_setup_ok(conn, token)
    if not ok:
        return c.render(p, "setup_owner.html", 400, token="", email="",
                        error=c._(p, "This set-up link has expired, or the site already has an"
                                     " owner. Restart the gateway for a new link."))
    return c.render(p, "setup_owner.html", status, token=token, error=error,
                    email=p.form.get("email", ""))


async def owner_setup(c: Any, p: Page) -> Response:
    token = p.form.get("token", "")
    await c.throttled(p, "setup", token[:12])
    try:
        accounts.check_password(p.form.get("password", ""))
        hashed = await c.passwords.hash(p.form["password"])
        async with c.db.acquire() as conn:
            uid = await accounts.create_owner(conn, token, p.form.get("email", ""), hashed)
            await store.audit(conn, f"setup:{uid}", "user.owner_setup", str(uid),
                              {"email": p.form.get("email", "")})
    except ACCOUNT_ERRORS as exc:
        return await owner_form(c, p, c._(p, str(exc)), 400)
    return await start_session(c, p, uid, mfa=False, to="/admin")
