"""Write examples/*.json for the city's dialog evening, dated relative to today (never stale).

`make run` calls this first; run it by hand with `python examples/generate.py`.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailer.ops.preview import sample_event, sample_event_with_everything


def main() -> None:
    here = Path(__file__).parent
    event = sample_event()
    event["id"] = "evt-7f3c9a"
    event["registration"]["id"] = "reg-1001"
    event["event"]["id"] = "weltoffen-dialog"
    (here / "registration.json").write_text(json.dumps(event, indent=2, ensure_ascii=False) + "\n")
    # The same evening with every optional field of the contract: booking code, management
    # link, event page, contact, access details, accessibility and an English title.
    full = sample_event_with_everything()
    full["id"] = "evt-full-1"
    full["registration"]["id"] = "reg-full-1"
    full["registration"]["attendee"] = {"email": "jane.doe@example.org", "name": "Jane Doe", "locale": "en"}
    full["event"]["id"] = "weltoffen-dialog"
    (here / "registration-full.json").write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n")
    now = datetime.now(UTC)
    lines = []
    for i, (name, locale) in enumerate([("Maria Müller", "de"), ("Ali Yılmaz", "de"), ("Jane Doe", "en")]):
        record = json.loads(json.dumps(event))
        record["id"] = f"evt-bulk-{i}"
        record["registration"] = {
            "id": f"reg-bulk-{i}",
            "attendee": {"email": f"person{i}@example.org", "name": name, "locale": locale},
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    lines.append('{"type": "registration.created", "id": "evt-broken"}')
    (here / "registrations.ndjson").write_text("\n".join(lines) + "\n")
    # A survey tool's export as German Excel saves it (Windows-1252, ";", CRLF), for
    # `mailer import-csv examples/registrations.csv --event examples/event.json`.
    (here / "event.json").write_text(json.dumps(event["event"], indent=2, ensure_ascii=False) + "\n")
    rows = [
        "Vorname;Nachname;E-Mail;Sprache",
        "Jürgen;Groß;juergen.gross@example.org;Deutsch",
        "Zoë;Weiß;zoe.weiss@example.org;de",
        "Jane;Doe;jane.doe@example.org;English",
        "Erika;Mustermann;;de",
    ]
    (here / "registrations.csv").write_bytes("".join(r + "\r\n" for r in rows).encode("cp1252"))
    moved = dict(event["event"])
    start = datetime.fromisoformat(moved["starts_at"]) + timedelta(hours=1)
    moved["starts_at"] = start.isoformat()
    moved["ends_at"] = (start + timedelta(hours=2, minutes=30)).isoformat()
    update = {"type": "event.updated", "id": "evt-update-1", "occurred_at": now.isoformat(), "event": moved}
    (here / "event-updated.json").write_text(json.dumps(update, indent=2, ensure_ascii=False) + "\n")
    cancel = {
        "type": "registration.cancelled",
        "id": "evt-cancel-1",
        "occurred_at": now.isoformat(),
        "registration": {"id": "reg-1001"},
    }
    (here / "registration-cancelled.json").write_text(json.dumps(cancel, indent=2) + "\n")


if __name__ == "__main__":
    main()
