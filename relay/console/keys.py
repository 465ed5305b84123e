"""Keys: list with filters, create (the secret shown once, with ready snippets), edit,
disable, enable, reset, delete, and each key's access configuration.

Every key is looked up and then checked against the signed-in user: another user's key
answers 404 exactly like one that does not exist. Changes go through accounting.store
(the functions the admin API and the CLI call) and are audited as `user:<id>`.
"""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

from accounting import plans, store
from accounting.money import parse_usd
from accounting.store import StoreError
from relay.console import back, catalog
from relay.console.web import USER, Page, Refused, Response


def routes(c: Any) -> None:
    r = c.router
    r.add("GET", "/console/keys", lambda p: keys_page(c, p), USER)
    r.add("POST", "/console/keys", lambda p: create(c, p), USER)
    r.add("GET", "/console/keys/{key}", lambda p: key_page(c, p), USER)
    r.add("POST", "/console/keys/{key}", lambda p: edit(c, p), USER)
    for action in ("disable", "enable", "reset", "delete"):
        r.add("POST", f"/console/keys/{{key}}/{action}",
              (lambda a: lambda p: act(c, p, a))(action), USER)


async def own_key(c: Any, p: Page, conn: Any, ref: str) -> store.Key:
    try:
        key_id = int(ref)
    except ValueError:
        raise Refused(404, c._(p, "No such key."))
    key = await store.get_key(conn, key_id)
    if key is None or key.user_id != p.user_id or key.status == "deleted":
        raise Refused(404, c._(p, "No such key."))
    return key


async def user_groups(c: Any, conn: Any, user_id: int) -> list[str]:
    """Groups a key holder may put a key in: "default", the groups of keys an operator
    gave them, and the groups of their plans. A holder never picks a cheaper group."""
    rows = await conn.fetch(
        "SELECT DISTINCT group_name FROM keys WHERE user_id = $1 AND status <> 'deleted'", user_id)
    groups = {"default", *(r[0] for r in rows)}
    for s in await plans.list_subscriptions(conn, user=user_id):
        if s.status == "active":
            groups.update((await plans.get_plan(conn, s.plan_id)).groups)
    return sorted(groups)


def _fields(c: Any, p: Page, groups: list[str]) -> dict[str, Any]:
    f = p.form
    out: dict[str, Any] = {"name": f.get("name", "").strip()[:100]}
    cap = f.get("cap", "").strip()
    out["cap_nano"] = parse_usd(cap, what="cap") if cap else 0
    models = [m.strip() for m in f.get("models", "").replace("\n", ",").split(",") if m.strip()]
    out["models"] = models or None
    exp = f.get("expires", "").strip()
    if exp:
        try:
            day = datetime.fromisoformat(exp).date()
        except ValueError:
            raise StoreError("expires: expected a date such as 2026-12-31")
        end = datetime.combine(day, time(23, 59, 59), tzinfo=c.zone(p)).astimezone(UTC)
        if end <= c.now():
            raise StoreError("expires: the date has passed")
        out["expires_at"] = end
    else:
        out["expires_at"] = None
    group = f.get("group", "default") or "default"
    if group not in groups:
        raise StoreError(f"group: {group!r} is not available to you")
    out["group"] = group
    return out


def snippets(base: str, secret: str, models: list[str]) -> dict[str, str]:
    oa = catalog.pick(models, ("gpt-4o-mini", "gpt-*", "o*", "*"))
    cl = catalog.pick(models, ("claude-sonnet*", "claude-*"))
    return {
        "curl": (f"curl {base}/v1/chat/completions \\\n"
                 f"  -H \"Authorization: Bearer {secret}\" \\\n"
                 "  -H \"Content-Type: application/json\" \\\n"
                 f"  -d '{{\"model\": \"{oa}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"),
        "openai": ("from openai import OpenAI\n\n"
                   f"client = OpenAI(base_url=\"{base}/v1\", api_key=\"{secret}\")\n"
                   f"reply = client.chat.completions.create(\n    model=\"{oa}\",\n"
                   "    messages=[{\"role\": \"user\", \"content\": \"Hello\"}],\n)\n"
                   "print(reply.choices[0].message.content)"),
        "codex": (f"export TOLLWAY_API_KEY={secret}\n"
                  "mkdir -p ~/.codex && cat >> ~/.codex/config.toml <<'EOF'\n"
                  f"model = \"{oa}\"\nmodel_provider = \"tollway\"\n\n"
                  "[model_providers.tollway]\nname = \"Tollway\"\n"
                  f"base_url = \"{base}/v1\"\nenv_key = \"TOLLWAY_API_KEY\"\nwire_api = \"responses\"\n"
                  "EOF\ncodex"),
        "claude": (f"export ANTHROPIC_BASE_URL={base}\n"
                   f"export ANTHROPIC_AUTH_TOKEN={secret}\n"
                   f"export ANTHROPIC_MODEL={cl}\nclaude"),
    }


async def keys_page(c: Any, p: Page, *, error: str = "", status: int = 200,
                    created: dict[str, Any] | None = None) -> Response:
    q = p.query
    async with c.db.acquire() as conn:
        keys = await store.list_keys(conn, p.user_id)
        groups = await user_groups(c, conn, p.user_id)
        subs = {s.id: s for s in await plans.list_subscriptions(conn, user=p.user_id)}
    name_q = q.get("q", "").strip().lower()
    state = q.get("status", "")
    group_q = q.get("group", "")
    shown = [k for k in keys
             if (not name_q or name_q in k.name.lower() or name_q in k.key_prefix.lower())
             and (not state or k.status == state) and (not group_q or k.group == group_q)]
    return c.render(p, "keys.html", status, keys=shown, total=len(keys), groups=groups,
                    error=error, created=created, subs=subs, now=c.now(), form=p.form,
                    filters={"q": q.get("q", ""), "status": state, "group": group_q})


async def create(c: Any, p: Page) -> Response:
    try:
        async with c.db.acquire() as conn:
            groups = await user_groups(c, conn, p.user_id)
            f = _fields(c, p, groups)
            async with conn.transaction():
                key_id, secret = await store.create_key(conn, p.user_id, **f)
                await store.audit(conn, f"user:{p.user_id}", "key.create", str(key_id),
                                  {"name": f["name"], "group": f["group"]})
    except (StoreError, ValueError) as exc:
        return await keys_page(c, p, error=c._(p, str(exc)), status=400)
    models = [m["model"] for m in catalog.priced(c.gw, f["group"], tuple(f["models"]) if f["models"] else None)]
    created = {"id": key_id, "name": f["name"], "secret": secret,
               "snippets": snippets(c.base_url(p), secret, models), "base": c.base_url(p)}
    p.form = {}
    return await keys_page(c, p, created=created)


async def key_page(c: Any, p: Page, *, error: str = "", status: int = 200,
                   secret: str | None = None) -> Response:
    async with c.db.acquire() as conn:
        key = await own_key(c, p, conn, p.params["key"])
        groups = await user_groups(c, conn, p.user_id)
    access = catalog.priced(c.gw, key.group, key.models)
    created = None
    if secret is not None:
        created = {"id": key.id, "name": key.name, "secret": secret, "base": c.base_url(p),
                   "snippets": snippets(c.base_url(p), secret, [m["model"] for m in access])}
    return c.render(p, "key.html", status, key=key, groups=groups, access=access, error=error,
                    multiplier=catalog.multiplier_text(c.gw, key.group), created=created,
                    zone=c.zone(p))


async def edit(c: Any, p: Page) -> Response:
    try:
        async with c.db.acquire() as conn:
            key = await own_key(c, p, conn, p.params["key"])
            groups = await user_groups(c, conn, p.user_id)
            if key.plan_id:
                groups = [key.group]  # a plan key stays in its plan's group
            f = _fields(c, p, groups)
            async with conn.transaction():
                await store.edit_key(conn, key.id, **f)
                await store.audit(conn, f"user:{p.user_id}", "key.edit", str(key.id),
                                  {"key_prefix": key.key_prefix, "group": f["group"]})
    except (StoreError, ValueError) as exc:
        return await key_page(c, p, error=c._(p, str(exc)), status=400)
    return back(f"/console/keys/{key.id}", ok="key_saved")


async def act(c: Any, p: Page, action: str) -> Response:
    secret = None
    async with c.db.acquire() as conn:
        key = await own_key(c, p, conn, p.params["key"])
        async with conn.transaction():
            if action == "disable":
                await store.set_key_status(conn, key.id, "disabled")
            elif action == "enable":
                await store.set_key_status(conn, key.id, "active")
            elif action == "delete":
                await store.delete_key(conn, key.id)
            else:
                secret = await store.reset_key(conn, key.id)
            await store.audit(conn, f"user:{p.user_id}", f"key.{action}", str(key.id),
                              {"key_prefix": key.key_prefix})
    if secret is not None:
        return await key_page(c, p, secret=secret)
    if action == "delete":
        return back("/console/keys", ok="key_deleted")
    return back(f"/console/keys/{key.id}", ok=f"key_{action}d")
