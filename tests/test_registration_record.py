"""A registration's record in Redis: every value comes back exactly, and the hash stays compact
(a listpack; Redis 6 calls it ziplist) however long, up to the contract's limits, or however
non-ASCII its name, booking code and management link are."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.events import Attendee, Registration
from mailer.intake.client import MailerClient
from mailer.state.queue import connect, connect_client
from mailer.state.store import StoredRegistration, load_registrations, pieces, registration_key
from tests.conftest import BERLIN, make_event, settled, wait_for
from tests.test_optional_fields import parts

COMPACT = {b"listpack", b"ziplist"}
# What registration systems hand out: a path, an id and a token; 150 bytes.
LONG_LINK = (
    "https://anmeldung.kaiserslautern.de/buergerbeteiligung/weltoffene-kommune/meine-anmeldung"
    "?registration=7f3c9a0b-5d1e-4c2a-9e8f-0a1b2c3d4e5f&token=b41e9c7d2a6f"
)
# At the contract's limits: a 2 000-character link, a 64-character code and a 300-character
# name, the last two in letters of two, three and four bytes.
LONGEST_LINK = "https://anmeldung.example.org/r?token=" + "7f3c9a0b" * 245 + "ab"
WIDE_REFERENCE = "Ü€𝄞-" * 16
WIDE_NAME = ("Zoë Ğüneş-Łukasiewicz 山田 花子 𝓜𝓪𝓻𝓲𝓪 " * 10)[:300]


async def encoding(redis_url: str, registration_id: str) -> bytes:
    redis = await connect(redis_url)
    try:
        found: bytes = await redis.object("encoding", registration_key(registration_id))
        return found
    finally:
        await redis.aclose()


async def test_a_long_management_link_keeps_the_record_compact(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A 150-byte management link is in the confirmation as given, and the registration's hash
    is still compact (it became a hashtable, ~5x the memory, when the link was one value)."""
    await mail_worker()
    registration = make_event()
    registration["registration"].update(reference="KL-2026-0815", manage_url=LONG_LINK)
    async with MailerClient(redis_url) as client:
        await client.publish(registration)
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
    await settled(redis_url)
    found = parts(smtp_server.handler.received[0].message.as_bytes())
    assert LONG_LINK in found["text"]
    assert await encoding(redis_url, "reg-1001") in COMPACT


async def test_values_at_the_contracts_limits_come_back_exactly_and_a_shorter_one_replaces_them(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """The longest link, a code and a name in letters of up to four bytes: the confirmation and,
    read back from Redis, the change notice carry them exactly; sent again with shorter values,
    the next notice has exactly those (no piece of the longer ones left at their end); the
    record stays compact throughout."""
    await mail_worker()
    start = datetime.now(BERLIN).replace(microsecond=0) + timedelta(days=10)
    registration = make_event(starts_at=start, name=WIDE_NAME)
    registration["registration"].update(reference=WIDE_REFERENCE, manage_url=LONGEST_LINK)
    shorter = make_event(starts_at=start, event_id="evt-again", name="Zoë")
    shorter["registration"].update(reference="Ü-1", manage_url=LONG_LINK)

    def moved(number: int) -> dict[str, Any]:
        begins = start + timedelta(hours=number)
        return {
            "type": "event.updated",
            "id": f"evt-move-{number}",
            "occurred_at": (datetime.now(UTC) + timedelta(milliseconds=number)).isoformat(),
            "event": dict(
                registration["event"],
                starts_at=begins.isoformat(),
                ends_at=(begins + timedelta(hours=2)).isoformat(),
            ),
        }

    async with MailerClient(redis_url) as client:
        await client.publish(registration)
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
        await client.publish(moved(1))
        await wait_for(lambda: len(smtp_server.handler.received) == 2)
        assert await encoding(redis_url, "reg-1001") in COMPACT
        await client.publish(shorter)
        await client.publish(moved(2))
        await wait_for(lambda: len(smtp_server.handler.received) == 3)
    await settled(redis_url)
    confirmation, first_notice, second_notice = (
        parts(r.message.as_bytes()) for r in smtp_server.handler.received
    )
    for found in (confirmation, first_notice):
        assert LONGEST_LINK in "".join(found["text"].split())  # the text part may wrap it
        assert WIDE_REFERENCE in found["text"]
        assert f"Guten Tag {WIDE_NAME}," in " ".join(found["text"].split())
    text = second_notice["text"].replace("\r\n", "\n")
    assert "Anmeldenummer: Ü-1\n" in text
    assert f"{LONG_LINK}\n" in text
    assert "Guten Tag Zoë," in second_notice["text"]
    assert await encoding(redis_url, "reg-1001") in COMPACT


def _contract_text(max_size: int, min_size: int = 0) -> st.SearchStrategy[str]:
    # What the contract lets through: no control characters or line separators, no surrogates.
    letters = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
    return st.text(letters, min_size=min_size, max_size=max_size)


LINKS = st.one_of(
    st.none(),
    _contract_text(1989).map(lambda tail: "https://a.b" + tail.replace(" ", "")),
    st.integers(3, 1992).map(lambda size: "https://" + "a" * size),  # every ASCII length
)
REGISTRATIONS = st.builds(
    lambda name, reference, link: Registration.model_validate(
        {
            "id": "reg-1",
            "attendee": {"email": "maria@example.org", "name": name},
            "reference": reference,
            "manage_url": link,
        }
    ),
    _contract_text(300),
    st.none() | _contract_text(64, min_size=1),
    LINKS,
)


def _stored(registration: Registration) -> StoredRegistration:
    attendee: Attendee = registration.attendee
    return StoredRegistration(
        registration.id, attendee, "evt", "active", 1, 1, registration.reference, registration.manage_url
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=REGISTRATIONS, second=REGISTRATIONS)  # the fixture only names the server
async def test_any_values_the_contract_allows_survive_redis_and_an_overwrite(
    redis_url: str, first: Registration, second: Registration
) -> None:
    """Written, read back, then written over with other values (HSET merges) and read back:
    name, code and link are exactly the newest ones; every field is at most 64 bytes but the
    address, and a record of ASCII values is compact."""
    redis = await connect_client(redis_url)
    try:
        key = registration_key("reg-1")
        await redis.delete(key)
        for registration in (first, second):
            stored = _stored(registration)
            fields = stored.to_fields()
            assert all(len(str(v).encode()) <= 64 for k, v in fields.items() if k != "ae")
            await redis.hset(key, mapping=fields)
            back = (await load_registrations(redis, ["reg-1"])).found["reg-1"]
            assert back.attendee is not None
            assert back.attendee.name == stored.attendee.name  # type: ignore[union-attr]
            assert (back.reference, back.manage_url) == (stored.reference, stored.manage_url)
        if all(str(v).isascii() for v in fields.values()):
            assert await redis.object("encoding", key) in COMPACT
    finally:
        await redis.aclose()


def test_a_record_written_before_values_were_cut_is_read_whole() -> None:
    """A link stored as one value by an earlier version (no "rm.1" after it) reads back whole,
    whatever its length; so does one of exactly a piece's length."""
    for link in (LONG_LINK, "https://example.org/" + "x" * 44, "https://example.org/" + "x" * 41):
        raw = {b"s": b"active", b"ae": b"maria@example.org", b"rm": link.encode()}
        assert StoredRegistration.from_fields("reg-1", raw).manage_url == link
        assert StoredRegistration.from_fields("reg-1", {**raw, **_raw(pieces("rm", link))}).manage_url == link


def _raw(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}
