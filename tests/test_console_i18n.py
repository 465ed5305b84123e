"""The Chinese catalogue covers every message the templates and pages say, and the
catalogues compile from the committed .po files (no build step)."""

from __future__ import annotations

import re
from pathlib import Path

from babel.messages.extract import extract_from_dir

from relay.console.i18n import LOCALE_DIR, catalogue

CONSOLE = Path(__file__).resolve().parent.parent / "relay" / "console"


def _template_ids() -> set[str]:
    method_map = [("**/templates/**.html", "jinja2")]
    options = {"**/templates/**.html": {"extensions": "jinja2.ext.i18n"}}
    out = set()
    for _file, _line, msg, _comments, _ctx in extract_from_dir(str(CONSOLE), method_map, options):
        text = msg if isinstance(msg, str) else msg[0]
        if text.strip(", "):
            out.add(text)
    return out


def _python_ids() -> set[str]:
    out = set()
    for f in [*CONSOLE.glob("*.py"), CONSOLE.parent.parent / "accounting" / "accounts.py"]:
        s = f.read_text()
        out.update(re.findall(r'c\._\(p, "([^"]+)"\)', s))
        out.update(re.findall(r'AccountError\("([^"]+)"\)', s))
        # Refusals raised in English are translated when the error page is rendered.
        out.update(re.findall(r'Refused\(\d+, "([^"]+)"\)', s))
    from relay.console import alerts, web

    out.update([web.NOT_FOUND, web.SERVER_ERROR, alerts.SUBJECT, alerts.BODY])
    return out


def test_every_message_has_a_chinese_translation() -> None:
    zh = catalogue("zh_Hans")
    ids = _template_ids() | _python_ids()
    assert len(ids) > 200
    same = {"Claude Code", "Codex"}  # product names read the same in Chinese
    missing = sorted(i for i in ids - same if zh.gettext(i) == i)
    assert not missing, missing


def test_placeholders_survive_translation() -> None:
    zh = catalogue("zh_Hans")
    for i in _template_ids():
        names = set(re.findall(r"%\((\w+)\)s", i))
        assert names == set(re.findall(r"%\((\w+)\)s", zh.gettext(i))), i


def test_catalogues_are_committed_as_po() -> None:
    assert (LOCALE_DIR / "zh_Hans" / "LC_MESSAGES" / "messages.po").exists()
