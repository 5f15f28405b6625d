"""The one exception tree of mailer; every error carries what an operator needs to act on it.

MailerError
├── ConfigError                 a setting is missing or malformed (exit status 2)
├── InvalidEvent                an event failed the contract (field + reason)
├── UnreadableImport            a file to import is unusable as a whole: encoding, header, columns
├── QueueUnavailable            Redis could not be reached or did not take the write
├── TemplateError               a template is missing or failed to render
├── ComposeError                a value cannot be put into a mail header or body
└── DeliveryError               the transport did not deliver a message
    ├── TransientDeliveryError  worth retrying (4xx, timeouts, dropped connections)
    │   ├── TimeoutDeliveryError    no reply in MAILER_SMTP_TIMEOUT (also a TimeoutError)
    │   ├── UncertainDeliveryError  the server may have accepted it (interrupted DATA)
    │   └── RelayFault              the relay is unwell, not the message: hold, don't count
    └── PermanentDeliveryError  never retried (5xx, invalid address)
"""

from __future__ import annotations

from dataclasses import dataclass


class MailerError(Exception):
    """Base class of every error mailer raises on purpose."""


class ConfigError(MailerError):
    """A setting is missing or has a bad value; `setting` names the MAILER_ variable."""

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One reason an event was refused: where in the record, and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class InvalidEvent(MailerError, ValueError):
    """An event did not match the contract; `problems` lists each field and reason."""

    def __init__(self, problems: list[FieldProblem], *, event_id: str | None = None) -> None:
        self.problems = problems
        self.event_id = event_id
        super().__init__("; ".join(str(p) for p in problems) or "invalid event")


class UnreadableImport(MailerError, ValueError):
    """A file to import cannot be read as a whole (not text, no header, a mapped column missing):
    nothing in it is imported; the command says so in one line (exit status 2)."""


class QueueUnavailable(MailerError, ConnectionError):
    """Redis did not answer or refused the write; nothing was reported as enqueued."""


class TemplateError(MailerError):
    """A template is missing, malformed, or failed on this message's data."""

    def __init__(self, message: str, *, template: str | None = None) -> None:
        super().__init__(message)
        self.template = template


class ComposeError(MailerError, ValueError):
    """A value cannot be placed in a mail (for instance CR/LF in a header)."""


class DeliveryError(MailerError):
    """The transport did not deliver a message.

    `code` and `enhanced_code` are the SMTP reply ("550", "5.1.1") when there was one;
    `detail` is the server's text or the local reason.
    """

    def __init__(
        self,
        detail: str,
        *,
        code: int | None = None,
        enhanced_code: str | None = None,
        recipient: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.enhanced_code = enhanced_code
        self.recipient = recipient


class TransientDeliveryError(DeliveryError):
    """Worth another attempt later: greylisting, throttling, timeouts, dropped connections."""


class TimeoutDeliveryError(TransientDeliveryError, TimeoutError):
    """The relay did not answer within MAILER_SMTP_TIMEOUT."""


class UncertainDeliveryError(TransientDeliveryError):
    """Interrupted after the data was handed over: the server may have accepted the message."""


class RelayFault(TransientDeliveryError):
    """What the relay says about itself, not about one message: refused or reset connections,
    timeouts at connect, 421/432, TLS and login failures, a malformed greeting.

    Such a fault opens the relay circuit (mailer.state.circuit): every worker holds its sends and
    one probe at a time tries again. `healable` is False for faults that waiting will not
    cure (wrong credentials, a refused certificate, STARTTLS missing): those are logged as
    errors naming `setting`, the MAILER_ variable(s) an operator must fix.
    """

    def __init__(
        self,
        detail: str,
        *,
        code: int | None = None,
        enhanced_code: str | None = None,
        recipient: str | None = None,
        healable: bool = True,
        setting: str | None = None,
    ) -> None:
        super().__init__(detail, code=code, enhanced_code=enhanced_code, recipient=recipient)
        self.healable = healable
        self.setting = setting


class PermanentDeliveryError(DeliveryError):
    """Will fail the same way every time: unknown user, rejected content, invalid address."""
