"""The low-balance email: a background task of one worker per host, off the request path.

Every `accounts.low_balance_check_s` it claims the alerts due (accounting.alerts: once
per crossing of the user's threshold, whichever worker or host claims it first) and
sends each in the user's language through the console's Mailer (with no SMTP
configured, the message goes to the server log). A message the SMTP server refused is
released again, so the next round retries it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from accounting import alerts
from relay.console.i18n import usd

log = logging.getLogger("tollway.console")

SUBJECT = "Your balance is low"
BODY = ("Your balance is {balance}, below the {threshold} you asked to be told about. "
        "You can top it up on the console's Wallet page, and change or turn off this alert "
        "on its Account page.")


class LowBalanceAlerts:
    def __init__(self, console: Any, interval_s: float) -> None:
        self.c = console
        self.interval = interval_s
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0 and self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop(), name="low-balance")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres away: try again next round
                log.warning("low-balance alerts: %s", exc)
            await asyncio.sleep(self.interval)

    async def run_once(self) -> int:
        """Claim and send the alerts due; returns how many were sent."""
        async with self.c.db.acquire() as conn:
            due = await alerts.claim_low_balance(conn)
        sent = 0
        for a in due:
            if await self.c.mailer.send(a.email, *self.message(a)):
                sent += 1
                continue
            async with self.c.db.acquire() as conn:
                await conn.execute("UPDATE users SET low_balance_sent_at = NULL WHERE id = $1",
                                   a.user_id)
        return sent

    def message(self, a: alerts.LowBalance) -> tuple[str, str]:
        c = self.c
        lang = a.lang if a.lang in c.langs.envs else "en"
        subject = f"{c.cfg.site_name}: {c.langs.gettext(lang, SUBJECT)}"
        body = c.langs.gettext(lang, BODY).format(balance=usd(a.balance_nano),
                                                  threshold=usd(a.threshold_nano))
        if c.cfg.public_url:  # without it the worker does not know the site's address
            body += "\n\n" + c.cfg.public_url.rstrip("/") + "/console/wallet"
        return subject, body
