"""Languages of the console: Babel catalogues compiled in memory at start, one Jinja2
environment per language, and the formatting of money, times and numbers per locale.

The catalogues are the committed `.po` files (locale/<lang>/LC_MESSAGES/messages.po);
they are compiled with babel.messages when the worker starts, so a clean clone installed
with pip needs no build step. English is the source language (msgids are English).
Templates autoescape; `{% trans %}` and `_()` use the new-style gettext (placeholders by
name, escaped).
"""

from __future__ import annotations

import gettext
import io
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from babel import Locale
from babel.dates import format_datetime
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal, format_percent

from accounting.money import format_usd

LOCALE_DIR = Path(__file__).parent / "locale"
TEMPLATE_DIR = Path(__file__).parent / "templates"
LANGS = ("en", "zh_Hans")
LANG_NAMES = {"en": "English", "zh_Hans": "简体中文"}
HTML_LANG = {"en": "en", "zh_Hans": "zh-Hans"}


def catalogue(lang: str) -> gettext.NullTranslations:
    po = LOCALE_DIR / lang / "LC_MESSAGES" / "messages.po"
    if not po.exists():
        return gettext.NullTranslations()
    with po.open("rb") as fh:
        cat = read_po(fh, locale=lang)
    buf = io.BytesIO()
    write_mo(buf, cat)
    buf.seek(0)
    return gettext.GNUTranslations(buf)


def usd(nano: int | None) -> str:
    """Exact dollars, at least two decimals: 5 -> "$5.00", 150_000 -> "$0.00015"."""
    if nano is None:
        return "—"
    text = format_usd(int(nano))
    sign = "-" if text.startswith("-") else ""
    text = text.lstrip("-")
    whole, _, frac = text.partition(".")
    return f"{sign}${int(whole):,}.{(frac + '00')[:max(2, len(frac))]}"


class Languages:
    def __init__(self, static: Any) -> None:
        self.envs: dict[str, jinja2.Environment] = {}
        self.translations: dict[str, gettext.NullTranslations] = {}
        for lang in LANGS:
            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                autoescape=True, extensions=["jinja2.ext.i18n"], trim_blocks=True,
                lstrip_blocks=True, auto_reload=False, undefined=jinja2.StrictUndefined)
            t = catalogue(lang)
            env.install_gettext_translations(t, newstyle=True)  # type: ignore[attr-defined]
            env.globals.update(static=static.url, lang=lang, html_lang=HTML_LANG[lang],
                               lang_names=LANG_NAMES, langs=LANGS)
            env.filters.update(usd=usd, dt=self._dt(lang), num=self._num(lang),
                               pct=self._pct(lang))
            self.envs[lang] = env
            self.translations[lang] = t

    def gettext(self, lang: str, message: str) -> str:
        return self.translations.get(lang, self.translations["en"]).gettext(message)

    @staticmethod
    def _dt(lang: str) -> Any:
        loc = Locale.parse(lang)

        @jinja2.pass_context
        def dt(ctx: Any, value: datetime | None, fmt: str = "medium") -> str:
            if value is None:
                return "—"
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            tz = ZoneInfo(ctx.get("tz") or "UTC")
            if fmt == "iso":
                return value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
            return format_datetime(value, format=fmt, tzinfo=tz, locale=loc)

        return dt

    @staticmethod
    def _num(lang: str) -> Any:
        loc = Locale.parse(lang)
        return lambda v: "—" if v is None else format_decimal(v, locale=loc)

    @staticmethod
    def _pct(lang: str) -> Any:
        loc = Locale.parse(lang)
        return lambda v: "—" if v is None else format_percent(v, format="#,##0.0%", locale=loc)


def best_lang(accept: str) -> str:
    for part in accept.split(","):
        tag = part.split(";")[0].strip().lower()
        if tag.startswith("zh"):
            return "zh_Hans"
        if tag.startswith("en"):
            return "en"
    return "en"
