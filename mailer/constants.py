"""Every Redis key, the queue name and the message kinds, in one place."""

from __future__ import annotations

from typing import Final, Literal

# All of mailer's keys share one prefix so an operator can find (and SCAN) them,
# and so one Redis can hold several unrelated apps.
PREFIX: Final = "mailer:"

# arq's sorted set of runnable jobs. arq's own job keys keep its "arq:" prefix.
QUEUE_NAME: Final = "mailer:queue"
# How often a job of a newer format than its worker reads was left in the queue for a newer
# worker (mailer.intake.job_bodies); expires with the job's body.
JOB_WAITS_KEY: Final = PREFIX + "job-waits:{job_id}"

# Producer event ids already applied: the idempotency store ("same id twice, one mail").
SEEN_KEY: Final = PREFIX + "seen:{event_id}"

# Hash per event: data (JSON), v (version = ICS SEQUENCE), t (occurred_at ms), status, prev (JSON).
EVENT_KEY: Final = PREFIX + "event:{event_id}"

# Set of the event's active registration ids, the fan-out list for reminders and notices.
EVENT_REGISTRATIONS_KEY: Final = PREFIX + "event:{event_id}:regs"

# Hash per registration: attendee email/name/locale (ae, an, al), event id (e), status (s),
# occurred_at ms (t), registered ms (c),
# plus one field "m:<kind>[/<disc>]" per message holding that message's state.
REGISTRATION_KEY: Final = PREFIX + "reg:{registration_id}"

# Single events from publish(), oldest first, until a worker has applied them (mailer.intake.inbox);
# "armed" holds when the pending drain job was started (ms), "lease" the token of the one
# worker draining, "seq" numbers the drain jobs.
INBOX_KEY: Final = PREFIX + "inbox"
INBOX_ARMED_KEY: Final = PREFIX + "inbox:armed"
INBOX_LEASE_KEY: Final = PREFIX + "inbox:lease"
INBOX_SEQ_KEY: Final = PREFIX + "inbox:seq"

# Sorted set of fan-outs still to run, member "<event_id>|<kind>|<disc>", score = due ms.
# One entry per event and reminder offset, so a reschedule touches a constant number of keys.
SCHEDULE_KEY: Final = PREFIX + "schedule"

# Sorted set of materialised messages not yet in a final state, score = when to look
# at them again (planned: due + grace, sending: lease end, retrying: next attempt).
DUE_KEY: Final = PREFIX + "due"

# The delivery log: a Redis stream, trimmed to MAILER_LOG_MAX_ENTRIES.
LOG_STREAM: Final = PREFIX + "log"
# Its indexes: per registration and per recipient (the address lower-cased), the stream ids of
# their entries, oldest first, as one field of a hash bucket (mailer.state.deliverylog says why).
LOG_BY_REGISTRATION_KEY: Final = PREFIX + "log:registration:{bucket}"
LOG_BY_RECIPIENT_KEY: Final = PREFIX + "log:recipient:{bucket}"
# ... and per reference (the registration system's booking code), as ops staff are often given it.
LOG_BY_REFERENCE_KEY: Final = PREFIX + "log:reference:{bucket}"
# Lists of entry positions (stream id as ms * 1024 + seq) per event ("e"), status ("s"), kind
# ("k") and event|status ("es"), oldest first: the other filters read a page of one of these.
LOG_LIST_KEY: Final = PREFIX + "log:by:{dim}:{value}"
# Counters kept on the append (scope "*" or "e:<event id>"): entries per "status|kind", sent
# entries per latency bucket, and the messages whose newest entry is `failed` (dead letters).
LOG_COUNTS_KEY: Final = PREFIX + "log:counts:{scope}"
LOG_LATENCY_KEY: Final = PREFIX + "log:latency:{scope}"
LOG_DEAD_KEY: Final = PREFIX + "log:dead:{scope}"
# The position from which every entry is in those lists and counters: the stream's top when
# this mailer first met it. Below it lie entries an older mailer wrote; filters walk them.
LOG_INDEXED_FROM_KEY: Final = PREFIX + "log:indexed-from"
# Send attempts counted by reply class and by duration, overall and anonymous (mailer.state.sendstats).
SEND_STATS_KEY: Final = PREFIX + "send:stats"

# The HTTP intake's Idempotency-Key answers (mailer.state.idempotency), by the key's SHA-256.
IDEMPOTENCY_KEY: Final = PREFIX + "idem:{digest}"

# Worker heartbeats (mailer.state.heartbeat): member = worker name, score = its last beat (ms).
WORKERS_KEY: Final = PREFIX + "workers"

# The relay circuit (mailer.state.circuit): a hash with its state (open/closed), the next probe
# time, the count of failed probes, and the last fault; and the lock of the one probe running.
RELAY_CIRCUIT_KEY: Final = PREFIX + "relay:{relay}:circuit"
RELAY_PROBE_KEY: Final = PREFIX + "relay:{relay}:probe"
RELAYS_KEY: Final = PREFIX + "relays"  # every relay whose circuit ever tripped
# Ops alert mails (MAILER_ALERT_EMAIL, mailer.state.alerts): the lock of the one check running
# across workers, each cause's quiet period since its last mail, and the dead-letter count told.
ALERT_CHECK_KEY: Final = PREFIX + "alert:check"
ALERT_QUIET_KEY: Final = PREFIX + "alert:quiet:{cause}"
ALERT_TOLD_DEAD_KEY: Final = PREFIX + "alert:told:dead_letters"
# The rate limit's window (MAILER_RATE_LIMIT).
RATE_KEY: Final = PREFIX + "rate:{window}"

# Registration ids and event ids may use these characters; "/" and "|" separate key parts.
ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$"

MessageKind = Literal[
    "confirmation", "reminder", "registration_cancelled", "event_changed", "event_cancelled"
]
MESSAGE_KINDS: Final[tuple[MessageKind, ...]] = (
    "confirmation",
    "reminder",
    "registration_cancelled",
    "event_changed",
    "event_cancelled",
)
# The delivery log also holds the alert mails ops get (mailer.ops.alerts); they are no
# attendee's message, so they have a kind of their own there and nowhere else.
OPS_ALERT_KIND: Final = "ops_alert"
LOG_KINDS: Final[tuple[str, ...]] = (*MESSAGE_KINDS, OPS_ALERT_KIND)
LOCALES: Final = ("de", "en")
