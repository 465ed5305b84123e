"""The console's HTTP plumbing: routes, the page context, cookies, CSRF and Origin checks.

Every page handler receives a `Page` (the request, its form, its session and account,
its language) and returns a `Response`. Before a handler runs, `Router.dispatch`:

- serves the content-hashed static files (`immutable`);
- loads the session from its cookie (only the token's hash is looked up); a token whose
  session ended sends the browser to the login page with the reason (device limit,
  password change, revocation), and clears the cookie;
- on every unsafe method, checks the Origin (or Referer) against the request's own
  host, then the CSRF token: the session's, or before login a double-submit cookie;
- refuses pages that need a login, and lets a session waiting for its second factor
  reach only the 2FA page;
- on the operator pages (/admin), refuses a role below the route's (VIEWER, ADMIN,
  OWNER; any unsafe method needs ADMIN at least) with 403, and sends an owner or admin
  without 2FA to turn it on before any of them.

It knows nothing about what the pages show; it never runs on a model route.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from accounting import accounts, sessions
from relay.errors import GatewayError
from relay.httpserver import HttpConnection, Request

log = logging.getLogger("tollway.console")

SESSION_COOKIE = "tw_session"
PRE_COOKIE = "tw_csrf"  # double-submit token for the forms before login
LANG_COOKIE = "tw_lang"
MAX_FORM = 64 * 1024

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
     b"img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
     b"form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]


class Refused(Exception):
    """Stop the request with this status and message (rendered as a small page)."""

    def __init__(self, status: int, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.lang = ""  # the page's language, once known (the error page speaks it)


# A body written piece by piece (large CSV exports): called with a write function that
# waits while the client's socket is full.
Stream = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: bytes = b"text/html; charset=utf-8"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    stream: Stream | None = None  # instead of body: sent chunked as it is produced

    def cookie(self, name: str, value: str, *, max_age: int | None = None, secure: bool = False,
               http_only: bool = True) -> None:
        parts = [f"{name}={value}", "Path=/", "SameSite=Lax"]
        if http_only:
            parts.append("HttpOnly")
        if secure:
            parts.append("Secure")
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        self.headers.append((b"set-cookie", "; ".join(parts).encode()))


def redirect(to: str, status: int = 303) -> Response:
    return Response(status, b"", headers=[(b"location", to.encode())])


@dataclass(slots=True)
class Page:
    req: Request
    rid: bytes
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    cookies: dict[str, str]
    ip: str
    secure: bool
    host: str
    form: dict[str, str] = field(default_factory=dict)
    form_lists: dict[str, list[str]] = field(default_factory=dict)
    session: sessions.Session | None = None
    account: accounts.Account | None = None
    token: str = ""
    ended: str = ""  # why this browser's session ended, when it did
    lang: str = "en"
    pre_csrf: str = ""  # the double-submit token a public form carries
    set_pre_csrf: bool = False
    htmx: bool = False

    @property
    def csrf(self) -> str:
        return self.session.csrf if self.session is not None else self.pre_csrf

    @property
    def user_id(self) -> int:
        assert self.account is not None
        return self.account.id

    @property
    def tz(self) -> str:
        return self.account.tz if self.account is not None else "UTC"

    @property
    def user_agent(self) -> str:
        return (self.req.header(b"user-agent") or b"").decode("utf-8", "replace")

    @property
    def cookie_name(self) -> str:
        return f"__Host-{SESSION_COOKIE}" if self.secure else SESSION_COOKIE


Handler = Callable[[Page], Awaitable[Response]]

_PARAM = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")
PUBLIC, USER, MFA = 0, 1, 2
NOT_FOUND = "This page does not exist."
SERVER_ERROR = "Something went wrong on our side."
# Operator pages: the least role a route needs. A route's unsafe methods need ADMIN
# whatever it says, so a viewer can never change anything by a mis-declared route.
VIEWER, ADMIN, OWNER = 10, 11, 12
ROLE_ACCESS = {"viewer": VIEWER, "admin": ADMIN, "owner": OWNER}


@dataclass(slots=True)
class Route:
    method: str
    regex: re.Pattern[str]
    handler: Handler
    access: int


class Router:
    def __init__(self, console: Any) -> None:
        self.console = console
        self.routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: Handler, access: int = USER) -> None:
        regex = re.compile("^" + _PARAM.sub(r"(?P<\1>[^/]+)", pattern) + "$")
        self.routes.append(Route(method, regex, handler, access))

    # --- request facts -------------------------------------------------------------------

    def _trusted(self, req: Request) -> bool:
        proxies = self.console.cfg.trusted_proxies
        try:
            addr = ipaddress.ip_address(req.client_ip)
        except ValueError:
            return False
        for p in proxies:
            try:
                if addr in ipaddress.ip_network(p, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def facts(self, req: Request) -> tuple[str, bool, str]:
        """(client address, over HTTPS, host) as the browser sees them."""
        trusted = self._trusted(req)
        ip = req.client_ip
        proto_https = False
        host = (req.header(b"host") or b"").decode("latin-1")
        if trusted:
            fwd = req.header(b"x-forwarded-for")
            if fwd:
                ip = fwd.decode("latin-1").split(",")[-1].strip() or ip
            proto = req.header(b"x-forwarded-proto")
            proto_https = proto is not None and proto.strip().lower() == b"https"
            fhost = req.header(b"x-forwarded-host")
            if fhost:
                host = fhost.decode("latin-1").split(",")[0].strip()
        mode = self.console.cfg.cookie_secure
        secure = mode == "always" or (mode == "auto" and proto_https)
        return ip, secure, host

    # --- dispatch ------------------------------------------------------------------------

    async def dispatch(self, req: Request, conn: HttpConnection, rid: bytes) -> None:
        path = unquote(req.path.decode("utf-8", "replace"))
        method = req.method.decode()
        if method == "HEAD":
            method = "GET"
        try:
            resp = await self._dispatch(req, rid, path, method)
        except Refused as exc:
            resp = self.console.refusal(exc)
        except Exception:
            log.exception("console page %s %s failed", method, path)
            resp = self.console.refusal(Refused(500, SERVER_ERROR))
        headers = [(b"content-type", resp.content_type), (b"x-request-id", rid), *resp.headers]
        if resp.content_type.startswith(b"text/html"):
            headers.extend(SECURITY_HEADERS)
            if not any(k == b"cache-control" for k, _ in resp.headers):
                headers.append((b"cache-control", b"no-store"))
        if resp.stream is not None and req.method != b"HEAD":
            await _send_stream(conn, resp.status, headers, resp.stream, method, path)
            return
        body = b"" if req.method == b"HEAD" else resp.body
        conn.send(resp.status, headers, body)

    async def _dispatch(self, req: Request, rid: bytes, path: str, method: str) -> Response:
        static = self.console.static.serve(path)
        if static is not None:
            return static
        route, params, allowed = None, {}, []
        for r in self.routes:
            m = r.regex.match(path)
            if m is None:
                continue
            if r.method != method:
                allowed.append(r.method)
                continue
            route, params = r, m.groupdict()
            break
        if route is None and allowed:
            return Response(405, b"Method Not Allowed", b"text/plain",
                            [(b"allow", ", ".join(sorted(set(allowed))).encode())])
        ip, secure, host = self.facts(req)
        query = {k: v[-1] for k, v in parse_qs(req.query.decode("utf-8", "replace")).items()}
        cookies = _cookies(req)
        page = Page(req, rid, method, path, params, query, cookies, ip, secure, host,
                    htmx=req.header(b"hx-request") is not None)
        await self._load_session(page)
        self.console.pick_lang(page)
        # From here on an error page speaks the page's language.
        try:
            if route is None:
                raise Refused(404, NOT_FOUND)
            return await self._run(page, route)
        except Refused as exc:
            exc.lang = exc.lang or page.lang
            raise
        except GatewayError as exc:
            # An operator action's refusal (relay.ops) that its page did not show inline.
            refused = Refused(exc.status if 400 <= exc.status < 500 else 500, exc.message)
            refused.lang = page.lang
            raise refused from exc
        except Exception as exc:
            log.exception("console page %s %s failed", method, path)
            refused = Refused(500, SERVER_ERROR)
            refused.lang = page.lang
            raise refused from exc

    async def _run(self, page: Page, route: Route) -> Response:
        method, path, req, cookies = page.method, page.path, page.req, page.cookies
        page.pre_csrf = cookies.get(PRE_COOKIE, "")
        if not page.pre_csrf or len(page.pre_csrf) > 64:
            page.pre_csrf = secrets.token_urlsafe(18)
            page.set_pre_csrf = True
        if method not in ("GET", "HEAD", "OPTIONS"):
            self._check_origin(page)
            self._parse_form(page)
            self._check_csrf(page)
        if route.access != PUBLIC:
            if page.session is None:
                if page.htmx:
                    return Response(401, b"", headers=[(b"hx-redirect", b"/console/login")])
                to = "/console/login"
                if page.ended:
                    to += f"?why={page.ended}"
                elif method == "GET" and path != "/console":
                    to += "?next=" + quote(path + ("?" + req.query.decode() if req.query else ""), safe="")
                resp = redirect(to)
                if page.query.get("lang") in ("en", "zh_Hans"):
                    resp.cookie(LANG_COOKIE, page.query["lang"], max_age=365 * 86400,
                                secure=page.secure)
                if page.ended:
                    resp.cookie(page.cookie_name, "", max_age=0, secure=page.secure)
                return resp
            if page.session.mfa_pending and route.access != MFA:
                return redirect("/console/login/2fa")
        if route.access >= VIEWER:
            assert page.account is not None
            need = route.access if method == "GET" else max(route.access, ADMIN)
            have = ROLE_ACCESS.get(page.account.role, USER)
            if have < need:
                raise Refused(403, "You do not have access to this page."
                              if have < VIEWER else "Your role cannot make this change.")
            if have >= ADMIN and not page.account.totp_enabled:
                # An operator who can change the site signs in with a second factor.
                if page.htmx:
                    return Response(401, b"", headers=[(b"hx-redirect", b"/console/account?ok=need_2fa")])
                return redirect("/console/account?ok=need_2fa")
        resp = await route.handler(page)
        chosen = page.query.get("lang")
        if chosen in ("en", "zh_Hans") and page.cookies.get(LANG_COOKIE) != chosen:
            resp.cookie(LANG_COOKIE, chosen, max_age=365 * 86400, secure=page.secure)
        if page.set_pre_csrf:
            resp.cookie(PRE_COOKIE, page.pre_csrf, secure=page.secure)
        if page.ended and page.session is None:
            resp.cookie(page.cookie_name, "", max_age=0, secure=page.secure)
        return resp

    async def _load_session(self, page: Page) -> None:
        token = page.cookies.get(page.cookie_name) or page.cookies.get(SESSION_COOKIE) \
            or page.cookies.get(f"__Host-{SESSION_COOKIE}")
        if not token or len(token) > 128:
            return
        idle = timedelta(seconds=self.console.cfg.session_idle_s)
        async with self.console.db.acquire() as conn:
            found = await sessions.lookup(conn, token, idle)
            if isinstance(found, sessions.Ended):
                page.ended = found.why
                return
            if found is None:
                page.ended = "expired"
                return
            account = await accounts.get(conn, found.user_id)
        if account is None or account.status != "active":
            page.ended = "disabled"
            return
        page.session, page.account, page.token = found, account, token

    def _check_origin(self, page: Page) -> None:
        """An unsafe request must come from a page of this site (Origin, else Referer)."""
        raw = page.req.header(b"origin") or page.req.header(b"referer")
        if raw is None or raw == b"null":
            raise Refused(403, "This form was sent from another site, or without its origin.")
        origin = urlsplit(raw.decode("latin-1"))
        allowed = {page.host.lower()}
        if self.console.cfg.public_url:
            allowed.add(urlsplit(self.console.cfg.public_url).netloc.lower())
        if origin.netloc.lower() not in allowed:
            raise Refused(403, "This form was sent from another site, or without its origin.")

    def _parse_form(self, page: Page) -> None:
        body = page.req.body
        if len(body) > MAX_FORM:
            raise Refused(413, "This form is too large.")
        ctype = (page.req.header(b"content-type") or b"").split(b";")[0].strip().lower()
        if body and ctype not in (b"application/x-www-form-urlencoded", b""):
            raise Refused(415, "Send this form as application/x-www-form-urlencoded.")
        lists = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        page.form_lists = lists
        page.form = {k: v[-1] for k, v in lists.items()}

    def _check_csrf(self, page: Page) -> None:
        sent = page.form.get("csrf") or (page.req.header(b"x-csrf-token") or b"").decode("latin-1")
        expected = page.session.csrf if page.session is not None else \
            page.cookies.get(PRE_COOKIE, "")
        if not expected or not sent or not secrets.compare_digest(sent, expected):
            raise Refused(403, "This form has expired. Reload the page and try again.")


async def _send_stream(conn: HttpConnection, status: int, headers: list[tuple[bytes, bytes]],
                       stream: Stream, method: str, path: str) -> None:
    """A chunked body from `stream`, waiting (bounded) whenever the client's socket is
    full; a client that goes away or stops reading ends it."""
    import asyncio

    resumed: asyncio.Event = asyncio.Event()
    conn.on_resume = resumed.set

    async def write(data: bytes) -> None:
        if conn.closed:
            raise ConnectionResetError("the client went away")
        conn.write(data)
        while conn.write_paused and not conn.closed:
            resumed.clear()
            try:
                await asyncio.wait_for(resumed.wait(), 60)
            except TimeoutError:
                raise ConnectionResetError("the client stopped reading")

    conn.start(status, headers, None)
    try:
        await stream(write)
    except ConnectionResetError:
        conn.abort()
        return
    except Exception:
        log.exception("console page %s %s failed while streaming", method, path)
        conn.abort()
        return
    finally:
        conn.on_resume = None
    conn.end()


def _cookies(req: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in req.headers:
        if k == b"cookie":
            c: SimpleCookie = SimpleCookie()
            try:
                c.load(v.decode("latin-1"))
            except Exception:
                continue
            for name, morsel in c.items():
                out.setdefault(name, morsel.value)
    return out
