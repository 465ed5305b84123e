"""Who reaches the operator pages, over real HTTP (written before the pages): every
/admin route is walked as anonymous, user, viewer, admin without 2FA, admin and owner.
A user reaches none; a viewer sees every page and changes nothing; every form needs the
session's CSRF token and this site's Origin; only an owner names operators; the first
owner comes from the one-time set-up link; `tollway users create` prints a link that
sets the password."""

from __future__ import annotations

import re

import asyncpg
import pytest

from accounting import accounts
from tests import console_client as cc
from tests.admin_client import make_operator, operator, sign_in
from tests.console_client import Browser


@pytest.fixture
async def h(pg_dsn: str):
    h = await cc.start(pg_dsn, verify_email=False, attempts_per_ip=10_000,
                       attempts_per_account=10_000)
    yield h
    await h.stop()


def _admin_routes(h) -> list[tuple[str, str]]:
    router = cc.console_of(h).router
    out = [(r.method, r.regex.pattern) for r in router.routes if r.access >= 10]
    assert out
    return out


def _path(pattern: str, ids: dict[str, str]) -> str:
    path = pattern.strip("^$")
    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", lambda m: ids.get(m.group(1), "1"), path)


async def _audit_count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit_log"))
    finally:
        await conn.close()


async def _ids(h) -> dict[str, str]:
    uid, key_id, _ = await h.user_and_key()
    return {"user": str(uid), "key": str(key_id), "channel": "mock-openai", "model": "gpt-4o-mini"}


async def test_a_user_reaches_no_operator_page(h) -> None:
    ids = await _ids(h)
    _, email = await make_operator(h, "user")
    b = await sign_in(h, email)
    anon = Browser(h)
    try:
        for method, pattern in _admin_routes(h):
            path = _path(pattern, ids)
            r = await (b.get(path, allow_redirects=False) if method == "GET" else
                       b.post(path, {"name": "x"}, allow_redirects=False))
            assert r.status == 403, (method, path, r.status)
            r = await (anon.get(path, allow_redirects=False) if method == "GET" else
                       anon.post(path, {"name": "x"}, allow_redirects=False))
            if method == "GET":
                assert r.status == 303 and r.headers["location"].startswith("/console/login"), path
            else:
                assert r.status == 403, (method, path)  # no session: no CSRF token to match
    finally:
        await b.close()
        await anon.close()


async def test_a_viewer_sees_every_page_and_changes_nothing(h) -> None:
    ids = await _ids(h)
    b, _ = await operator(h, "viewer")
    try:
        for method, pattern in _admin_routes(h):
            if method == "GET":
                path = _path(pattern, ids)
                r = await b.get(path, allow_redirects=False)
                assert r.status in (200, 404), (path, r.status, b.last[:300])
        await b.get("/admin")
        assert 'data-testid="read-only"' in b.last
        assert "<form method=\"post\" action=\"/admin" not in b.last
        before = await _audit_count(h.dsn)
        for method, pattern in _admin_routes(h):
            if method == "POST":
                path = _path(pattern, ids)
                r = await b.post(path, {"name": "x", "amount": "5", "note": "n", "role": "owner"},
                                 allow_redirects=False)
                assert r.status == 403, (path, r.status)
        assert await _audit_count(h.dsn) == before
    finally:
        await b.close()


async def test_every_operator_form_needs_csrf_and_origin(h) -> None:
    ids = await _ids(h)
    b, _ = await operator(h, "owner")
    foreign = Browser(h, origin="http://evil.example")
    try:
        await b.get("/admin/users")
        before = await _audit_count(h.dsn)
        for method, pattern in _admin_routes(h):
            if method != "POST":
                continue
            path = _path(pattern, ids)
            r = await b.post(path, {"amount": "5", "note": "n"}, csrf=False, allow_redirects=False)
            assert r.status == 403, ("no csrf", path, r.status)
            r = await b.post(path, {"amount": "5", "note": "n", "csrf": "wrong"},
                             allow_redirects=False)
            assert r.status == 403, ("bad csrf", path)
            foreign.http.cookie_jar.update_cookies(
                {c.key: c.value for c in b.http.cookie_jar})
            foreign.csrf = b.csrf
            r = await foreign.post(path, {"amount": "5", "note": "n"}, allow_redirects=False)
            assert r.status == 403, ("foreign origin", path)
        assert await _audit_count(h.dsn) == before
    finally:
        await b.close()
        await foreign.close()


async def test_an_admin_without_2fa_is_sent_to_turn_it_on(h) -> None:
    _, email = await make_operator(h, "admin", totp=False)
    b = await sign_in(h, email)
    try:
        r = await b.get("/admin/users", allow_redirects=False)
        assert r.status == 303 and r.headers["location"] == "/console/account?ok=need_2fa"
        r = await b.get("/admin/users")
        assert r.url.path == "/console/account" and "two-factor" in b.last
    finally:
        await b.close()


async def test_only_an_owner_names_operators(h) -> None:
    admin, _ = await operator(h, "admin")
    owner, _ = await operator(h, "owner")
    target, _ = await make_operator(h, "user")
    try:
        await admin.get(f"/admin/users/{target}")
        r = await admin.post(f"/admin/users/{target}/account", {"role": "admin"})
        assert r.status == 403 and "Only an owner" in admin.last
        await admin.get("/admin/users")
        r = await admin.post("/admin/users", {"email": cc.new_email(), "role": "viewer"})
        assert r.status == 403
        await owner.get(f"/admin/users/{target}")
        r = await owner.post(f"/admin/users/{target}/account", {"role": "viewer"})
        assert r.status == 200 and r.url.path == f"/admin/users/{target}"
        conn = await asyncpg.connect(h.dsn)
        try:
            assert await conn.fetchval("SELECT role FROM users WHERE id = $1", target) == "viewer"
            row = await conn.fetchrow("SELECT detail, before FROM audit_log WHERE action ="
                                      " 'user.account' AND target = $1", str(target))
            assert '"viewer"' in row["detail"] and '"user"' in row["before"]
        finally:
            await conn.close()
    finally:
        await admin.close()
        await owner.close()


async def test_an_owner_makes_an_operator_who_sets_the_password_by_link(h) -> None:
    owner, _ = await operator(h, "owner")
    new = Browser(h)
    try:
        await owner.get("/admin/users")
        email = cc.new_email()
        r = await owner.post("/admin/users", {"email": email, "role": "viewer", "name": ""})
        assert r.status == 200
        url = re.search(r'data-testid="setup-url">([^<]+)<', owner.last).group(1)
        path = url[url.index("/console/set-password"):]
        await new.get(path)
        r = await new.post("/console/set-password", {"token": path.split("token=")[1],
                                                     "email": email, "password": "a long password"})
        assert r.status == 200
        r = await new.get("/admin/users")
        assert r.status == 200 and 'data-testid="user-row"' in new.last
    finally:
        await owner.close()
        await new.close()


async def test_the_first_owner_comes_from_the_set_up_link(h, capsys) -> None:
    conn = await asyncpg.connect(h.dsn)
    try:
        owners = [r["id"] for r in await conn.fetch("SELECT id FROM users WHERE role = 'owner'")]
        await conn.execute("UPDATE users SET role = 'admin' WHERE id = ANY($1::bigint[])", owners)
        try:
            from relay.server import _owner_setup

            await _owner_setup(h.cfg, conn)
            out = capsys.readouterr().out
            token = re.search(r"/console/setup-owner\?token=(\S+)", out).group(1)
            b = Browser(h)
            try:
                await b.get("/console/login")
                assert "no owner yet" in b.last
                r = await b.get("/console/setup-owner?token=wrong")
                assert r.status == 400
                await b.get(f"/console/setup-owner?token={token}")
                email = cc.new_email()
                r = await b.post("/console/setup-owner", {"token": token, "email": email,
                                                          "password": "the owner's password"})
                # An owner without 2FA is sent to turn it on before any operator page.
                assert r.url.path == "/console/account"
                assert await conn.fetchval("SELECT role FROM users WHERE email = $1", email) == "owner"
                assert not await accounts.owner_setup_ok(conn, token)
                again = Browser(h)
                r = await again.get(f"/console/setup-owner?token={token}")
                await again.close()
                assert r.status == 400
            finally:
                await b.close()
        finally:
            await conn.execute("UPDATE users SET role = 'owner' WHERE id = ANY($1::bigint[])", owners)
    finally:
        await conn.close()


async def test_the_shell_makes_an_operator_with_a_set_password_link(h, tmp_path, capsys) -> None:
    import asyncio

    from relay import cli

    conf = tmp_path / "config.toml"
    conf.write_text(f'[database]\ndsn = "{h.dsn}"\n')
    email = cc.new_email()
    code = await asyncio.to_thread(cli.main, ["--config", str(conf), "users", "create", "ops-ann",
                                              "--email", email, "--role", "admin"])
    out = capsys.readouterr().out
    assert code == 0, out
    path = re.search(r"(/console/set-password\?token=\S+)", out).group(1)
    b = Browser(h)
    try:
        r = await b.get(path)
        assert r.status == 200 and 'name="password"' in b.last
        r = await b.post("/console/set-password", {"token": path.split("token=")[1], "email": email,
                                                   "password": "set from the link"})
        assert r.status == 200
        r = await b.get("/admin", allow_redirects=False)  # an admin turns 2FA on first
        assert r.headers["location"] == "/console/account?ok=need_2fa"
    finally:
        await b.close()
    conn = await asyncpg.connect(h.dsn)
    try:
        row = await conn.fetchrow("SELECT role, name FROM users WHERE email = $1", email)
        assert (row["role"], row["name"]) == ("admin", "ops-ann")
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'user.create'"
                                   " AND actor LIKE 'cli:%' AND detail->>'email' = $1", email) == 1
    finally:
        await conn.close()


async def test_junk_never_breaks_an_operator_page(h) -> None:
    """Every /admin route, as an owner, with nonsense in every query field and form field:
    a message or a 404, never a 500."""
    ids = await _ids(h)
    b, _ = await operator(h, "owner")
    junk = "x'\"<>%00\\..%"
    fields = ("q", "role", "status", "cursor", "prefix", "user", "group", "name", "batch", "state",
              "start", "end", "from", "to", "key", "model", "channel", "span", "a", "b", "actor",
              "action", "target", "amount", "note", "count", "expires_at", "max_devices",
              "concurrency", "rpm", "tpm", "max_ips", "session", "models", "allowed_cidrs", "cap",
              "protocol", "base_url", "priority", "weight", "max_concurrency", "input", "output",
              "effective_at", "price", "credit", "validity", "reset", "validity_days", "title",
              "body", "starts_at", "ends_at", "multiplier", "signup", "min_topup", "smtp_port",
              "invite_share")
    try:
        for method, pattern in _admin_routes(h):
            for variant in (ids, {k: junk for k in ids}):
                path = _path(pattern, variant).replace("%", "%25").replace("'", "%27")
                if method == "GET":
                    r = await b.get(path + "?" + "&".join(f"{f}=%27x%3C" for f in fields))
                else:
                    await b.get("/admin/users")
                    r = await b.post(path, dict.fromkeys(fields, junk))
                assert r.status < 500, (method, path, r.status, b.last[:300])
    finally:
        await b.close()
