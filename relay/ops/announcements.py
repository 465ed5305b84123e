"""Announcements: the site's voice on every key holder's home page. Written in Markdown,
rendered with markdown-it (no raw HTML) and then sanitised with nh3 (an allow-list of
tags and attributes, links get rel="noopener noreferrer nofollow"), so even a stolen
operator account cannot put script on users' pages. Each has a start (it may be
scheduled) and an optional end; a user sees the ones started since their last visit
marked as new.
"""

from __future__ import annotations

from typing import Any

import nh3
from markdown_it import MarkdownIt

from accounting import store
from relay import errors as E
from relay.ops.base import Op
from relay.ops.parse import id_, only, text, time_

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
_TAGS = {"p", "br", "strong", "em", "code", "pre", "ul", "ol", "li", "a", "blockquote", "h3",
         "h4", "table", "thead", "tbody", "tr", "th", "td", "hr"}
MAX_BODY = 20_000


def render(markdown: str) -> str:
    """Safe HTML from Markdown (headings are demoted: the page has its own)."""
    html = _MD.render(markdown).replace("<h1>", "<h3>").replace("</h1>", "</h3>") \
        .replace("<h2>", "<h4>").replace("</h2>", "</h4>")
    return nh3.clean(html, tags=_TAGS, attributes={"a": {"href", "title"}},
                     url_schemes={"http", "https", "mailto"}, link_rel="noopener noreferrer nofollow")


_COLS = "id, title, body, starts_at, ends_at, created_at, created_by, updated_at"


async def announcements_list(op: Op) -> Any:
    async with op.read() as conn:
        rows = await conn.fetch(f"SELECT {_COLS} FROM announcements ORDER BY starts_at DESC, id DESC"
                                " LIMIT 200")
    return {"data": [{**dict(r), "html": render(r["body"])} for r in rows], "next": None}


def _fields(body: dict[str, Any], *, create: bool) -> dict[str, Any]:
    only(body, {"title", "body", "starts_at", "ends_at"})
    out: dict[str, Any] = {}
    title = (text(body, "title", required=create) or "").strip()
    if create or "title" in body:
        if not title or len(title) > 200:
            raise E.InvalidRequest("title: required, at most 200 characters")
        out["title"] = title
    if "body" in body:
        md = text(body, "body") or ""
        if len(md) > MAX_BODY:
            raise E.InvalidRequest(f"body: at most {MAX_BODY} characters")
        out["body"] = md
    if "starts_at" in body:
        out["starts_at"] = time_(body, "starts_at")
    if "ends_at" in body:
        out["ends_at"] = time_(body, "ends_at")
    return out


async def announcements_create(op: Op) -> dict[str, Any]:
    f = _fields(op.body(), create=True)
    async with op.tx() as conn:
        row = await conn.fetchrow(
            "INSERT INTO announcements (title, body, starts_at, ends_at, created_by)"
            f" VALUES ($1, $2, coalesce($3, now()), $4, $5) RETURNING {_COLS}",
            f["title"], f.get("body", ""), f.get("starts_at"), f.get("ends_at"), op.actor)
        if row["ends_at"] is not None and row["ends_at"] <= row["starts_at"]:
            raise E.InvalidRequest("ends_at: must be after starts_at")
        await store.audit(conn, op.actor, "announcement.create", str(row["id"]),
                          {"title": row["title"], "starts_at": row["starts_at"].isoformat(),
                           "ends_at": row["ends_at"].isoformat() if row["ends_at"] else None})
    return dict(row)


async def announcements_edit(op: Op) -> dict[str, Any]:
    f = _fields(op.body(), create=False)
    ann = id_(op.params["announcement"], "announcement")
    async with op.tx() as conn:
        old = await conn.fetchrow(f"SELECT {_COLS} FROM announcements WHERE id = $1 FOR UPDATE", ann)
        if old is None:
            raise E.NotFound(f"announcement {ann} not found")
        new = {**dict(old), **{k: v for k, v in f.items() if k != "starts_at" or v is not None}}
        if new["ends_at"] is not None and new["ends_at"] <= new["starts_at"]:
            raise E.InvalidRequest("ends_at: must be after starts_at")
        row = await conn.fetchrow(
            "UPDATE announcements SET title = $2, body = $3, starts_at = $4, ends_at = $5,"
            f" updated_at = now() WHERE id = $1 RETURNING {_COLS}",
            ann, new["title"], new["body"], new["starts_at"], new["ends_at"])
        changed = {k: f[k] for k in f if f[k] != old[k]}
        await store.audit(conn, op.actor, "announcement.edit", str(ann),
                          {k: (v.isoformat() if hasattr(v, "isoformat") else v)
                           for k, v in changed.items()},
                          before={k: (old[k].isoformat() if hasattr(old[k], "isoformat") else old[k])
                                  for k in changed})
    return dict(row)


async def announcements_end(op: Op) -> dict[str, Any]:
    """Take an announcement down now (it stays in the list, ended)."""
    ann = id_(op.params["announcement"], "announcement")
    async with op.tx() as conn:
        row = await conn.fetchrow(
            "UPDATE announcements SET ends_at = now(), starts_at = least(starts_at, now()),"
            f" updated_at = now() WHERE id = $1 RETURNING {_COLS}", ann)
        if row is None:
            raise E.NotFound(f"announcement {ann} not found")
        await store.audit(conn, op.actor, "announcement.end", str(ann), {"title": row["title"]})
    return dict(row)


async def for_user(conn: Any, user_id: int, limit: int = 5) -> list[dict[str, Any]]:
    """The announcements live now, newest first, each marked `new` when it started after
    the user's last visit to the home page; the visit is then recorded."""
    rows = await conn.fetch(
        "SELECT a.id, a.title, a.body, a.starts_at, a.starts_at > u.announcements_seen_at AS new"
        " FROM announcements a, users u WHERE u.id = $1 AND a.starts_at <= now()"
        " AND (a.ends_at IS NULL OR a.ends_at > now()) ORDER BY a.starts_at DESC, a.id DESC"
        " LIMIT $2", user_id, limit)
    out = [{**dict(r), "html": render(r["body"])} for r in rows]
    if any(a["new"] for a in out):
        await conn.execute("UPDATE users SET announcements_seen_at = now() WHERE id = $1", user_id)
    return out
