"""Email for the console: verification and reset codes, setup links, low-balance alerts.

With `accounts.smtp_host` set, mail goes out through aiosmtplib; without it the message
is written to the server log (for development and the quick start). `outbox` keeps the
last messages in memory either way, for tests and the demo.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from email.message import EmailMessage
from typing import Any

log = logging.getLogger("tollway.console")


class Mailer:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.outbox: deque[tuple[str, str, str]] = deque(maxlen=100)

    async def send(self, to: str, subject: str, body: str) -> bool:
        """Send (or, with no SMTP, log) one message; False when the SMTP server failed."""
        self.outbox.append((to, subject, body))
        cfg = self.cfg
        if not cfg.smtp_host:
            log.warning("console email (no SMTP configured) to %s: %s: %s", to, subject, body)
            return True
        import aiosmtplib

        msg = EmailMessage()
        msg["From"] = cfg.smtp_from or cfg.smtp_user
        msg["To"] = to
        msg["Subject"] = subject
        msg.set_content(body)
        try:
            await aiosmtplib.send(
                msg, hostname=cfg.smtp_host, port=cfg.smtp_port,
                username=cfg.smtp_user or None,
                password=os.environ.get(cfg.smtp_password_env) or None,
                use_tls=cfg.smtp_tls == "tls", start_tls=cfg.smtp_tls == "starttls",
                timeout=15)
        except Exception as exc:
            log.error("console email to %s failed: %s", to, exc)
            return False
        return True

    def last_code(self, to: str) -> str | None:
        """The last code sent to `to` (tests and the demo)."""
        import re

        for addr, _, body in reversed(self.outbox):
            if addr.lower() == to.lower():
                m = re.search(r"\b(\d{6})\b", body)
                if m:
                    return m.group(1)
        return None
