"""The send path for a batch of messages: check, claim, render, compose, hand over, record."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from mailer.clock import Clock, from_ms, iso, ms, utc_now
from mailer.content.render import Renderer
from mailer.delivery.builder import MessageBuilder
from mailer.delivery.retry import RetryPolicy
from mailer.delivery.transport import Accepted, Lane, Transport
from mailer.errors import (
    DeliveryError,
    MailerError,
    PermanentDeliveryError,
    RelayFault,
    UncertainDeliveryError,
)
from mailer.lifecycle.kinds import KINDS
from mailer.settings import Settings
from mailer.state.circuit import Gate, RelayCircuit
from mailer.state.deliverylog import DeliveryLog, LogEntry, LogStatus
from mailer.state.message_states import Claim, MessageStore
from mailer.state.messages import MessageRef, MessageState, Status
from mailer.state.replication import ReplicaGate, one_connection
from mailer.state.sendstats import attempt_fields, reply_class
from mailer.state.store import (
    RedisClient,
    StoredEvent,
    StoredRegistration,
    load_events,
    load_registrations,
)
from mailer.state.throttle import Throttle

logger = logging.getLogger("mailer.sender")


@dataclass(slots=True)
class _Job:
    """One claimed message on its way out."""

    claim: Claim
    registration: StoredRegistration
    event: StoredEvent
    recipient: str = ""
    data: bytes = b""
    took_us: int = 0  # how long its send took (sendstats counts it)


@dataclass(slots=True)
class _Outcomes:
    """What the lanes of one batch sent: log entries, their JSON, and the raw results."""

    entries: list[LogEntry] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    results: list[DeliveryError | str] = field(default_factory=list)
    # Set by the first relay fault of the batch: the lanes stop, the rest is held until then.
    hold_until_ms: int | None = None
    tripping: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set when Redis failed a hand-over (gone, or replicas behind): the lanes stop, so the
    # job gives up at once instead of each lane meeting the same failure in turn.
    redis_lost: bool = False


def why_not_send(
    ref: MessageRef, reg: StoredRegistration | None, stored: StoredEvent | None, now: datetime
) -> str | None:
    """The send-time re-check: None if the message should still go out, else the reason.

    Whatever the scheduler did, this is what decides, against the state as it is now.
    """
    if reg is None or reg.attendee is None or stored is None:
        return "registration or event not found"
    return KINDS[ref.kind].why_not_send(ref, reg, stored, now)


class Sender:
    """Delivers batches of messages; every message keeps its own state and log entries."""

    def __init__(
        self,
        *,
        redis: RedisClient,
        settings: Settings,
        transport: Transport,
        renderer: Renderer,
        log: DeliveryLog,
        clock: Clock = utc_now,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.transport = transport
        self.log = log
        self.clock = clock
        self.store = MessageStore(redis)
        self.policy = RetryPolicy(
            settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds
        )
        self.builder = MessageBuilder(settings=settings, renderer=renderer)
        self.throttle = Throttle(redis, per_minute=settings.rate_limit)
        self.circuit = RelayCircuit(
            redis,
            relay=transport.name,
            base_ms=int(1000 * settings.relay_probe_base_seconds),
            cap_ms=int(1000 * settings.relay_probe_max_seconds),
        )
        # Lease on a claimed message: if its worker dies, it is sent again after this.
        self.lease_ms = int(1000 * (settings.smtp_timeout + 10))
        # A send (opening a connection included) must end within its lease, with time left to
        # record the outcome: past the lease another worker may re-claim and send it too.
        self.send_budget_s = settings.smtp_timeout + 8
        # A probe opens one connection: connect, STARTTLS and AUTH, each within the timeout.
        self.probe_lease_ms = int(1000 * (3 * settings.smtp_timeout + 5))
        self.message_ttl_ms = int(settings.message_ttl.total_seconds() * 1000)
        self.replicas = ReplicaGate(settings.redis_min_replicas)
        self._token = uuid.uuid4().hex
        self.stopping = False

    def stop(self) -> None:
        """The worker is shutting down (SIGTERM): finish the sends already handed over, start no
        new one, and hand the messages this worker still holds claimed back to the others."""
        self.stopping = True

    async def deliver(
        self,
        messages: Iterable[MessageRef | str],
        *,
        registrations: dict[str, StoredRegistration] | None = None,
        events: dict[str, StoredEvent] | None = None,
    ) -> list[LogEntry]:
        """Send these messages; `registrations`/`events` are state the caller already holds.

        One message's trouble (it cannot be built, its data is odd) is that message's
        outcome, never the batch's: the others go on.
        """
        refs = [m if isinstance(m, MessageRef) else MessageRef.parse(m) for m in messages]
        if not refs:
            return []
        now = self.clock()
        regs, events, unreadable = await self._load(refs, dict(registrations or {}), dict(events or {}))
        claims = await self.store.claim(refs, now_ms=ms(now), lease_ms=self.lease_ms)

        entries, writes, jobs = self._prepare_all(claims, regs, events, unreadable, now)
        await self._record(writes, entries)
        entries += [entry for _, _, entry in writes]
        jobs = await self._hold_back(jobs, now)
        sent = _Outcomes()
        queue = deque(jobs)
        lanes = min(len(jobs), self.settings.smtp_max_connections)
        # Every lane runs to its end even if one fails (Redis gone mid-batch): the others'
        # outcomes are recorded and printed before the failure is raised for the job to retry.
        failures = await asyncio.gather(
            *(self._run_lane(queue, sent) for _ in range(lanes)), return_exceptions=True
        )
        self.log.print_json(sent.lines)
        if queue and sent.hold_until_ms is not None:
            await self._hold(list(queue), sent.hold_until_ms, self.clock(), "relay unavailable")
        elif queue:
            # The lanes stopped for a shutdown or a lost Redis (or replica): what they did not
            # start goes back to the others; with Redis gone this raises, and the job is retried.
            why = None if self.stopping else "Redis or a replica was lost mid-batch; sent again later"
            await self._hand_back(list(queue), why)
        for failure in failures:
            if isinstance(failure, BaseException):
                raise failure
        return entries + sent.entries

    # --- steps --------------------------------------------------------------------------

    def _prepare_all(
        self,
        claims: list[Claim],
        regs: dict[str, StoredRegistration],
        events: dict[str, StoredEvent],
        unreadable: dict[str, Exception],
        now: datetime,
    ) -> tuple[list[LogEntry], list[tuple[Claim, MessageState, LogEntry]], list[_Job]]:
        """Build each claimed message; what cannot go out becomes its skip or failure to record."""
        entries: list[LogEntry] = []
        writes: list[tuple[Claim, MessageState, LogEntry]] = []
        jobs: list[_Job] = []
        for claim in claims:
            if claim.code not in ("claimed", "reclaimed"):
                continue  # final already, leased by another worker, or not due yet
            reg = regs.get(claim.ref.registration_id)
            stored = events.get(reg.event_id) if reg and reg.event_id else None
            try:
                broken = _unreadable(claim.ref, reg, unreadable)
                job = broken or self._prepare(claim, reg, stored, now, entries)
            except Exception as exc:
                # A bug or data nobody foresaw: visible once, with its traceback, and final.
                logger.exception("cannot build message %s", claim.ref.id)
                job = f"internal error while building: {type(exc).__name__}: {exc}"
            if isinstance(job, str):
                status: Literal["skipped", "failed"] = "skipped" if job.startswith("skip: ") else "failed"
                entry = self._entry(claim, reg, stored, status, job.removeprefix("skip: "), now)
                writes.append((claim, self._state(status, claim, now), entry))
                continue
            jobs.append(job)
        return entries, writes, jobs

    async def _load(
        self,
        refs: list[MessageRef],
        regs: dict[str, StoredRegistration],
        events: dict[str, StoredEvent],
    ) -> tuple[dict[str, StoredRegistration], dict[str, StoredEvent], dict[str, Exception]]:
        """Complete the state the caller passed in from Redis; and what could not be read."""
        missing = [r.registration_id for r in refs if r.registration_id not in regs]
        loaded_regs = await load_registrations(self.redis, missing)
        regs.update(loaded_regs.found)
        missing = [r.event_id for r in regs.values() if r.event_id and r.event_id not in events]
        loaded_events = await load_events(self.redis, missing)
        events.update(loaded_events.found)
        unreadable = {f"registration {k}": v for k, v in loaded_regs.unreadable.items()}
        unreadable |= {f"event {k}": v for k, v in loaded_events.unreadable.items()}
        for what, exc in unreadable.items():
            logger.error("stored %s cannot be read, its messages fail: %s", what, exc)
        return regs, events, unreadable

    def _prepare(
        self,
        claim: Claim,
        reg: StoredRegistration | None,
        stored: StoredEvent | None,
        now: datetime,
        entries: list[LogEntry],
    ) -> _Job | str:
        """The job to send, or why not: "skip: <reason>" or a failure reason."""
        if claim.attempt > self.settings.max_attempts:
            used, most = claim.attempt - 1, self.settings.max_attempts
            return f"no attempts left ({used} of MAILER_MAX_ATTEMPTS={most} used)"
        reason = why_not_send(claim.ref, reg, stored, now)
        if reason is not None:
            return "skip: " + reason
        assert reg is not None  # why_not_send returned None, so both exist
        assert stored is not None
        if claim.previous in ("retrying", "held") and ms(now) >= self._deadline_ms(claim, stored):
            return "deadline passed before it could be sent"
        job = _Job(claim, reg, stored)
        try:
            self._compose(job, now)
        except MailerError as exc:
            return f"cannot render: {exc}"
        if claim.code == "reclaimed":
            entries.append(
                self._entry(
                    claim,
                    reg,
                    stored,
                    "uncertain",
                    "found in sending after an interrupted attempt; resending, "
                    "so the recipient may get it twice",
                    now,
                )
            )
        return job

    def _compose(self, job: _Job, now: datetime) -> None:
        job.recipient = job.registration.attendee.email if job.registration.attendee else ""
        job.data = self.builder.build(job.claim.ref, job.registration, job.event, now).data

    def _deadline_ms(self, claim: Claim, stored: StoredEvent) -> int:
        """Event start for reminders, MAILER_MESSAGE_TTL after planning otherwise."""
        if KINDS[claim.ref.kind].deadline == "event_start":
            return ms(stored.event.starts_at)
        return claim.since_ms + self.message_ttl_ms

    async def _hold_back(self, jobs: list[_Job], now: datetime) -> list[_Job]:
        """Keep back what the relay circuit or the rate limit does not allow now.

        Held messages wait with the attempt they were claimed with given back: waiting is
        not failing. While the circuit is open, the first worker whose hold has run out
        probes the relay with one connection; the others keep holding.
        """
        if not jobs:
            return jobs
        if self.stopping:
            await self._hand_back(jobs)
            return []
        now_ms = ms(now)
        gate, until = await self.circuit.gate(
            now_ms=now_ms, token=self._token, probe_lease_ms=self.probe_lease_ms
        )
        if gate is Gate.PROBE:
            gate, until = await self._probe(now)
        if gate is Gate.HOLD:
            # A hold that has run out means another worker is probing: look again shortly.
            until = until if until > now_ms else now_ms + 1000
            await self._hold(jobs, until, now, "relay unavailable")
            return []
        granted, resume_ms = await self.throttle.grant(len(jobs), now_ms)
        if granted < len(jobs):
            await self._hold(jobs[granted:], resume_ms, now, "MAILER_RATE_LIMIT reached")
        return jobs[:granted]

    async def _probe(self, now: datetime) -> tuple[Gate, int]:
        """This worker holds the probe lock: open one connection to see if the relay is back."""
        try:
            await self.transport.probe()
        except DeliveryError as exc:  # only a connection that really opened closes the circuit
            fault = exc if isinstance(exc, RelayFault) else RelayFault(exc.detail, code=exc.code)
            trip = await self._trip(fault)
            return Gate.HOLD, trip.until_ms
        await self.circuit.close(now_ms=ms(self.clock()))
        logger.warning("relay %s answers again: sending resumes", self.transport.name)
        return Gate.SEND, 0

    async def _trip(self, fault: RelayFault) -> Any:
        trip = await self.circuit.trip(fault, now_ms=ms(self.clock()))
        wait_s = max(0, trip.until_ms - ms(self.clock())) / 1000
        if not fault.healable:
            logger.error(
                "relay %s refuses us and waiting will not help: %s. Fix %s; all workers hold "
                "their mail (nothing is failed before its deadline) and probe again in %.0f s",
                self.transport.name,
                fault.detail,
                fault.setting or "the relay settings",
                wait_s,
            )
        else:
            logger.warning(
                "relay %s unavailable (%s, %d in a row): all workers hold their mail, next probe in %.1f s",
                self.transport.name,
                fault.detail,
                trip.failures,
                wait_s,
            )
        return trip

    async def _hand_back(self, jobs: list[_Job], why: str | None = None) -> None:
        """Shutting down: what this worker claimed but has not handed to the relay waits as
        `held`, due at once, so the per-second tick gives it to a worker that stays."""
        now = self.clock()
        await self._hold(jobs, ms(now), now, why or "worker stopping (SIGTERM), left for the other workers")

    async def _hold(self, jobs: list[_Job], until_ms: int, now: datetime, why: str) -> None:
        """Park claimed messages until `until_ms` (spread a little); fail those past their deadline."""
        now_ms = ms(now)
        spread = max(1000, (until_ms - now_ms) // 4)
        writes: list[tuple[Claim, MessageState, LogEntry | None]] = []
        for job in jobs:
            claim = job.claim
            at = until_ms + random.randrange(min(spread, 10_000))
            if at >= self._deadline_ms(claim, job.event):
                detail = f"{why} until after the message's deadline"
                entry = self._entry(claim, job.registration, job.event, "failed", detail, now)
                writes.append((claim, self._state("failed", claim, now), entry))
                continue
            held = MessageState("held", claim.attempt - 1, claim.since_ms, now_ms, at)
            logged = None
            if claim.previous != "held":  # log the hold once, not at every look
                detail = f"{why}; held until {iso(from_ms(at))}, attempt not counted"
                logged = self._entry(claim, job.registration, job.event, "held", detail, now)
            writes.append((claim, held, logged))
        await self._record(writes, [])
        logger.info("holding %d message(s) until %d (%s)", len(jobs), until_ms, why)

    async def _run_lane(self, queue: deque[_Job], outcomes: _Outcomes) -> None:
        """Send messages one after another over one held connection.

        A message is marked `sending` only once this connection is free for it, and in the
        same round trip as the previous message's outcome: a worker killed at any point
        leaves at most two messages per connection whose fate is unknown (logged `uncertain`
        when resent), and costs one Redis round trip per mail. After a relay fault, or once
        the worker is stopping, the lanes stop; what is left in the queue is held.
        """
        async with self.transport.lane() as lane:
            done: tuple[_Job, DeliveryError | str] | None = None
            while queue and outcomes.hold_until_ms is None and not outcomes.redis_lost and not self.stopping:
                job = queue.popleft()
                if not await self._handover(done, job, outcomes):
                    done = None
                    continue  # our claim lapsed and another worker holds the message now
                try:
                    result: DeliveryError | str = (await self._send(lane, job)).detail
                except RelayFault as fault:
                    result = fault
                    async with outcomes.tripping:
                        if outcomes.hold_until_ms is None:
                            outcomes.hold_until_ms = (await self._trip(fault)).until_ms
                except DeliveryError as exc:
                    result = exc
                except TimeoutError:  # the budget ran out (SMTP's own timeouts are DeliveryErrors)
                    result = UncertainDeliveryError(
                        f"no outcome within {self.send_budget_s:g} s (the message's lease)",
                        recipient=job.recipient,
                    )
                except Exception as exc:
                    # A transport that raised something it should have mapped (a bug): this
                    # message's outcome, unknown since it was handed over, not the batch's.
                    logger.exception("the transport raised for %s", job.claim.ref.id)
                    result = UncertainDeliveryError(
                        f"internal error in the transport: {type(exc).__name__}: {exc}"[:500],
                        recipient=job.recipient,
                    )
                outcomes.results.append(result)
                done = (job, result)
            if done is not None:
                await self._handover(done, None, outcomes)

    async def _send(self, lane: Lane, job: _Job) -> Accepted:
        """One message's transaction on the lane's connection, timed for the send counters."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.send_budget_s):
                sender = self.builder.sender.email
                return await lane.send(sender=sender, recipient=job.recipient, data=job.data)
        finally:
            job.took_us = int((time.perf_counter() - started) * 1_000_000)

    async def _handover(
        self, done: tuple[_Job, DeliveryError | str] | None, following: _Job | None, outcomes: _Outcomes
    ) -> bool:
        """Record one outcome and mark the next message as handed over, in one command.

        False if the next message's claim no longer holds (it must not be sent).
        """
        now = self.clock()
        recorded = counted = None
        if done is not None:
            job, result = done
            state, entry = self._outcome(job, result, now, outcomes.hold_until_ms)
            line = entry.to_json()  # once: for the Redis step and for the echo
            outcomes.entries.append(entry)
            outcomes.lines.append(line)
            recorded = (job.claim.ref, state, job.claim.attempt, self.log.parts(entry))
            code = None if isinstance(result, str) else result.code
            klass = reply_class(code, accepted=isinstance(result, str))
            counted = attempt_fields(self.transport.name, klass, job.took_us)
        handed = None
        if following is not None:
            claim = following.claim
            sending = MessageState("sending", claim.attempt, claim.since_ms, ms(now), ms(now) + self.lease_ms)
            handed = (claim.ref, claim.attempt, sending)
        # With MAILER_REDIS_MIN_REPLICAS the `sending` mark must reach the replicas before the
        # mail goes out, so a resend after a failover is logged `uncertain` (state.replication).
        replicas = self.replicas.replicas if handed is not None else 0
        try:
            async with one_connection(self.redis, replicas=replicas) as conn:
                stepped = await self.store.step(recorded, handed, counted=counted, client=conn)
                if stepped and replicas:
                    await self.replicas.confirm(conn, what="a message's hand-over")
        except BaseException:
            outcomes.redis_lost = True  # the other lanes hand nothing more over
            raise
        return stepped

    def _outcome(
        self, job: _Job, result: DeliveryError | str, now: datetime, hold_until_ms: int | None
    ) -> tuple[MessageState, LogEntry]:
        claim, reg, stored = job.claim, job.registration, job.event
        if isinstance(result, str):
            return self._state("sent", claim, now), self._entry(claim, reg, stored, "sent", result, now)
        code, enhanced = result.code, result.enhanced_code
        detail = result.detail
        deadline = self._deadline_ms(claim, stored)
        if isinstance(result, RelayFault) and hold_until_ms is not None and hold_until_ms < deadline:
            state = MessageState("held", claim.attempt - 1, claim.since_ms, ms(now), hold_until_ms)
            until = iso(from_ms(hold_until_ms))
            detail = f"relay unavailable ({detail}); held until {until}, attempt not counted"
            return state, self._entry(claim, reg, stored, "held", detail, now, code, enhanced)
        if isinstance(result, UncertainDeliveryError):
            detail = f"outcome unknown ({detail}); the server may have accepted it"
        if not isinstance(result, PermanentDeliveryError):
            retry_at = self.policy.next_attempt_ms(
                attempt=claim.attempt, now_ms=ms(now), deadline_ms=deadline
            )
            if retry_at is not None:
                state = MessageState("retrying", claim.attempt, claim.since_ms, ms(now), retry_at)
                entry = self._entry(claim, reg, stored, "retrying", detail, now, code, enhanced)
                return state, entry
            detail += " (no attempts or time left)"
        entry = self._entry(claim, reg, stored, "failed", detail, now, code, enhanced)
        return self._state("failed", claim, now), entry

    async def _record(
        self, writes: Sequence[tuple[Claim, MessageState, LogEntry | None]], entries: list[LogEntry]
    ) -> None:
        """Write states of messages this worker claimed (each only while its claim holds, with
        its log entry only then) and other log entries."""
        kept = await self.store.settle([(claim.ref, claim.attempt, state) for claim, state, _ in writes])
        logged = [e for (_, _, e), ok in zip(writes, kept, strict=True) if ok and e is not None]
        await self.log.write(entries + logged)

    # --- small helpers ------------------------------------------------------------------

    @staticmethod
    def _state(status: Status, claim: Claim, now: datetime) -> MessageState:
        return MessageState(status, claim.attempt, claim.since_ms, ms(now), 0)

    def _entry(
        self,
        claim: Claim,
        reg: StoredRegistration | None,
        stored: StoredEvent | None,
        status: LogStatus,
        detail: str,
        now: datetime,
        code: int | None = None,
        enhanced: str | None = None,
    ) -> LogEntry:
        ref = claim.ref
        kind = KINDS[ref.kind]
        built = status in ("sent", "retrying", "failed", "uncertain")  # a mail was handed to the relay
        sequence = stored.version + kind.sequence_bump if stored and kind.calendar and built else None
        return LogEntry(
            ts=iso(now),
            status=status,
            message_id=claim.ref.id,
            kind=claim.ref.kind,
            registration_id=claim.ref.registration_id,
            event_id=stored.event.id if stored else (reg.event_id or "" if reg else ""),
            recipient=reg.attendee.email if reg and reg.attendee else "",
            attempt=claim.attempt,
            detail=detail,
            worker=self.log.worker,
            smtp_code=code,
            enhanced_code=enhanced,
            locale=reg.attendee.locale if reg and reg.attendee else "",
            reference=(reg.reference or "") if reg else "",
            message_id_header=ref.header_id(self.builder.domain) if built else "",
            sequence=sequence,
            latency_ms=max(0, ms(now) - claim.since_ms) if status == "sent" and claim.since_ms else None,
        )


def _unreadable(
    ref: MessageRef, reg: StoredRegistration | None, unreadable: dict[str, Exception]
) -> str | None:
    """Why this message cannot be built from what is stored, if a record it needs is unreadable."""
    for what in (f"registration {ref.registration_id}", f"event {reg.event_id if reg else ''}"):
        if what in unreadable:
            return f"stored {what} cannot be read: {type(unreadable[what]).__name__}: {unreadable[what]}"[
                :500
            ]
    return None
