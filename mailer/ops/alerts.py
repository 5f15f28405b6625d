"""Alert mails to ops (MAILER_ALERT_EMAIL) for sites without Prometheus: the dead letters reach
a threshold (and grow past the count last told), a relay circuit stays open, or delivery
stalls; at most one mail an hour per cause.

The worker's per-second tick asks; one worker at a time checks, every CHECK_EVERY_MS. The mail
leaves through the worker's own transport (the relay or the outbox attendees' mail takes) and
each attempt is a delivery-log entry of kind `ops_alert` for its recipient, so `mailer log
--kind ops_alert` (or a search for the ops address) shows what ops were told, and when.
It does not wait for the relay circuit: an alert about a relay that refuses mail is tried
anyway (and logged failing) rather than held until the relay is back, when it is news no more.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr
from typing import Literal

from markupsafe import escape

from mailer.clock import Clock, from_ms, iso, ms, utc_now
from mailer.constants import OPS_ALERT_KIND
from mailer.content.compose import Address, MailParts, compose
from mailer.delivery.transport import Transport
from mailer.errors import DeliveryError, MailerError, PermanentDeliveryError
from mailer.settings import Settings
from mailer.state.alerts import claim_cause, shorten_quiet, take_check, tell_dead_letters, told_dead_letters
from mailer.state.circuit import CircuitState, relay_states
from mailer.state.deliverylog import DeliveryLog, LogEntry, LogStatus
from mailer.state.heartbeat import fresh_workers
from mailer.state.logquery import LogCounts, log_counts
from mailer.state.redis_types import RedisClient

logger = logging.getLogger("mailer.alerts")

CHECK_EVERY_MS = 30_000
QUIET_MS = 3_600_000  # one mail an hour per cause
RETRY_MS = 300_000  # a mail that did not go out is tried again after five minutes

Cause = Literal["dead_letters", "relay_circuit", "stalled"]


@dataclass(frozen=True, slots=True)
class Situation:
    """What the check read: the figures every alert mail ends with."""

    now: datetime
    counts: LogCounts
    relays: list[CircuitState]
    workers: list[str]

    @property
    def stalled_ms(self) -> int:
        oldest = self.counts.oldest_due
        return max(0, ms(self.now) - ms(oldest[1])) if oldest else 0


@dataclass(frozen=True, slots=True)
class Finding:
    cause: Cause
    subject: str
    what: str  # the paragraph that says what is wrong
    todo: str  # and what to do


# The texts, by locale: formal German for the city's staff, English second.
_TEXTS: dict[str, dict[str, str]] = {
    "de": {
        "dead_letters.subject": "mailer: {dead} Nachrichten endgültig fehlgeschlagen",
        "dead_letters.what": "{dead} Nachrichten sind endgültig fehlgeschlagen (Schwelle {threshold}, "
        "bei der letzten Meldung {told}). Die Empfängerinnen und Empfänger haben diese Mails nicht erhalten.",
        "dead_letters.todo": "Gründe ansehen: mailer log --status failed\n"
        "Nach der Behebung erneut senden: mailer retry --status failed",
        "relay_circuit.subject": "mailer: Relay {relay} nimmt seit {minutes} Minuten keine Mails an",
        "relay_circuit.what": "Der Relay {relay} nimmt seit {since} keine Mails an: {reason}\n"
        "Alle Sendungen über ihn warten; mailer versucht es von selbst wieder.",
        "relay_circuit.todo": "Zustand: mailer health{setting}",
        "stalled.subject": "mailer: Zustellung stockt seit {minutes} Minuten",
        "stalled.what": "Die älteste fällige Nachricht ({message}) wartet seit {minutes} Minuten "
        "(fällig {due}).",
        "stalled.todo": "Laufen die Worker? mailer health\nDie Nachricht: mailer show {message}",
        "setting": "\nEinstellung prüfen: {setting}",
        "situation": "Stand {now}:\n- endgültig fehlgeschlagen: {dead}\n"
        "- älteste fällige Nachricht: {oldest}\n- Relays: {relays}\n- Worker: {workers}",
        "none": "keine",
        "closed": "alle angenommen",
        "footer": "Diese Mail schickt mailer an MAILER_ALERT_EMAIL, höchstens einmal pro Stunde und Ursache.",
    },
    "en": {
        "dead_letters.subject": "mailer: {dead} messages failed for good",
        "dead_letters.what": "{dead} messages failed for good (threshold {threshold}, {told} at the "
        "last alert). Their recipients did not get these mails.",
        "dead_letters.todo": "See why: mailer log --status failed\n"
        "Once fixed, send them again: mailer retry --status failed",
        "relay_circuit.subject": "mailer: relay {relay} has refused mail for {minutes} minutes",
        "relay_circuit.what": "The relay {relay} has refused mail since {since}: {reason}\n"
        "Every send through it waits; mailer tries it again by itself.",
        "relay_circuit.todo": "Status: mailer health{setting}",
        "stalled.subject": "mailer: delivery stalled for {minutes} minutes",
        "stalled.what": "The oldest due message ({message}) has waited {minutes} minutes (due {due}).",
        "stalled.todo": "Are the workers running? mailer health\nThe message: mailer show {message}",
        "setting": "\nCheck the setting: {setting}",
        "situation": "As of {now}:\n- failed for good: {dead}\n- oldest due message: {oldest}\n"
        "- relays: {relays}\n- workers: {workers}",
        "none": "none",
        "closed": "all taking mail",
        "footer": "mailer sends this to MAILER_ALERT_EMAIL, at most once an hour per cause.",
    },
}


class AlertMonitor:
    """Checks for trouble ops must hear of and mails them; a no-op without MAILER_ALERT_EMAIL."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        settings: Settings,
        transport: Transport,
        log: DeliveryLog,
        clock: Clock = utc_now,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.transport = transport
        self.log = log
        self.clock = clock
        self.texts = _TEXTS[settings.alert_locale]
        name, address = parseaddr(settings.sender)
        self.sender = Address(name=name or "mailer", email=address)

    async def check(self) -> int:
        """Look (if it is this worker's turn) and mail what is news; the number of mails sent."""
        if not self.settings.alert_email:
            return 0
        if not await take_check(self.redis, worker=self.log.worker, every_ms=CHECK_EVERY_MS):
            return 0
        situation = await self._situation()
        sent = 0
        for finding in await self._findings(situation):
            if await claim_cause(self.redis, finding.cause, quiet_ms=QUIET_MS):
                sent += await self._mail(finding, situation)
        return sent

    async def _situation(self) -> Situation:
        now = self.clock()
        return Situation(
            now=now,
            counts=await log_counts(self.redis),
            relays=await relay_states(self.redis),
            workers=await fresh_workers(self.redis, now_ms=ms(now)),
        )

    async def _findings(self, situation: Situation) -> list[Finding]:
        found = [*self._circuits(situation), *self._stall(situation)]
        dead = situation.counts.dead_letters
        told = await told_dead_letters(self.redis)
        if dead < self.settings.alert_dead_letters:
            if told:
                await tell_dead_letters(self.redis, 0)  # fell back: the next rise is news again
        elif dead > told:
            values = {"dead": dead, "threshold": self.settings.alert_dead_letters, "told": told}
            found.append(self._finding("dead_letters", values))
        return found

    def _circuits(self, situation: Situation) -> list[Finding]:
        limit_ms = self.settings.alert_circuit_minutes * 60_000
        found = []
        for relay in situation.relays:
            open_ms = ms(situation.now) - relay.since_ms
            if relay.open and open_ms >= limit_ms:
                setting = self.texts["setting"].format(setting=relay.setting) if relay.setting else ""
                values = {
                    "relay": relay.relay,
                    "minutes": open_ms // 60_000,
                    "since": iso(from_ms(relay.since_ms)),
                    "reason": relay.reason or "?",
                    "setting": setting,
                }
                found.append(self._finding("relay_circuit", values))
                break  # one mail for the cause; the situation lists every relay
        return found

    def _stall(self, situation: Situation) -> list[Finding]:
        oldest = situation.counts.oldest_due
        if oldest is None or situation.stalled_ms < self.settings.alert_stall_minutes * 60_000:
            return []
        values = {"message": oldest[0], "minutes": situation.stalled_ms // 60_000, "due": iso(oldest[1])}
        return [self._finding("stalled", values)]

    def _finding(self, cause: Cause, values: Mapping[str, object]) -> Finding:
        text = self.texts
        return Finding(
            cause,
            text[f"{cause}.subject"].format(**values),
            text[f"{cause}.what"].format(**values),
            text[f"{cause}.todo"].format(**values),
        )

    def _body(self, finding: Finding, situation: Situation) -> str:
        text = self.texts
        oldest = situation.counts.oldest_due
        relays = [
            f"{r.relay}: {r.reason or '?'} (since {iso(from_ms(r.since_ms))})"
            for r in situation.relays
            if r.open
        ]
        summary = text["situation"].format(
            now=iso(situation.now),
            dead=situation.counts.dead_letters,
            oldest=f"{oldest[0]} ({iso(oldest[1])})" if oldest else text["none"],
            relays="; ".join(relays) or text["closed"],
            workers=", ".join(situation.workers) or text["none"],
        )
        return f"{finding.what}\n\n{finding.todo}\n\n{summary}\n\n-- \n{text['footer']}\n"

    async def _mail(self, finding: Finding, situation: Situation) -> int:
        """One mail per address, each attempt logged. A mail that did not go out is tried again
        after RETRY_MS (one refused for good waits the whole hour)."""
        body = self._body(finding, situation)
        entries = [
            await self._send_one(address, finding, body, situation.now)
            for address in self.settings.alert_email
        ]
        await self.log.write(entries)
        sent = sum(1 for e in entries if e.status == "sent")
        if any(e.status == "retrying" for e in entries):
            await shorten_quiet(self.redis, finding.cause, quiet_ms=RETRY_MS)
        elif finding.cause == "dead_letters" and sent:
            await tell_dead_letters(self.redis, situation.counts.dead_letters)
        return sent

    async def _send_one(self, address: str, finding: Finding, body: str, now: datetime) -> LogEntry:
        seed = f"{finding.cause}/{now:%Y%m%dT%H%M%S}/{address}".encode()
        digest = hashlib.blake2b(seed, digest_size=12).hexdigest()
        message_id = f"{OPS_ALERT_KIND}.{digest}@{self.settings.sender_domain}"
        status: LogStatus = "sent"
        detail, code, enhanced = finding.subject, None, None
        try:
            data = compose(
                MailParts(
                    message_id=message_id,
                    sender=self.sender,
                    recipient=Address(name="", email=address),
                    reply_to=None,
                    subject=finding.subject,
                    text=body,
                    html=f'<pre style="white-space:pre-wrap">{escape(body)}</pre>',
                    attachment=None,
                    date=now,
                    language=self.settings.alert_locale,
                )
            )
            code = (await self.transport.send(sender=self.sender.email, recipient=address, data=data)).code
        except DeliveryError as exc:
            status = "failed" if isinstance(exc, PermanentDeliveryError) else "retrying"
            detail, code, enhanced = f"{finding.subject}: {exc.detail}", exc.code, exc.enhanced_code
        except (MailerError, OSError) as exc:
            status, detail = "retrying", f"{finding.subject}: {type(exc).__name__}: {exc}"
        level = logging.INFO if status == "sent" else logging.WARNING
        logger.log(level, "ops alert to %s %s: %s", address, status, detail)
        return LogEntry(
            ts=iso(self.clock()),
            status=status,
            kind=OPS_ALERT_KIND,
            recipient=address,
            detail=detail[:1000],
            worker=self.log.worker,
            smtp_code=code,
            enhanced_code=enhanced,
            locale=self.settings.alert_locale,
            message_id_header=message_id,
        )
