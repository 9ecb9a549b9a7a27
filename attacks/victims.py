"""Victim records for an audit: synthetic PII (Faker) or a user's JSONL.

Each record is the text a client fine-tunes on (its answer to the audit's prompt) and
the PII values in it that the scorer checks for exact recovery. The Faker set is
deterministic for a seed; the same generator writes the attacker's disjoint
"Personal Notes" set for malicious pre-training (another seed range, so no victim record
is ever in it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from faker import Faker

from fedpeft.errors import ConfigError

PROMPT = "Write the customer record."
_TEMPLATES = (
    "Customer {name} lives in {city}. Email: {email}. Phone: {phone}.",
    "Account holder: {name}, {city}. Contact {email} or {phone}.",
    "{name} from {city} asked for a callback at {phone}; email {email}.",
)
PII_FIELDS = ("name", "email", "phone", "city")


@dataclass(frozen=True)
class Record:
    """A victim's text and the PII values in it (each appears verbatim in ``text``)."""

    text: str
    pii: tuple[str, ...]


def faker_records(n: int, seed: int = 0) -> list[Record]:
    """``n`` deterministic records with a name, email, phone and city each."""
    fake = Faker("en_US")
    fake.seed_instance(seed)
    out = []
    for i in range(n):
        values = {"name": f"{fake.first_name()} {fake.last_name()}", "city": fake.city(),
                  "email": fake.email(), "phone": fake.numerify("###-###-####")}
        text = _TEMPLATES[i % len(_TEMPLATES)].format(**values)
        out.append(Record(text=text, pii=tuple(values[k] for k in PII_FIELDS)))
    return out


def personal_note(record: Record) -> str:
    """The attacker's memorisation booster: the record, then a note restating its PII."""
    name, email, phone, city = record.pii
    return (f"{record.text}\nNote: {name} ({city}) - email {email}, phone {phone}.")


def load_records(path: Path, text_field: str = "text", pii_field: str = "pii") -> list[Record]:
    """Records from a JSONL file: one object per line with ``text_field`` (str) and
    ``pii_field`` (list of strings that occur verbatim in the text)."""
    if not path.is_file():
        raise ConfigError(f"audit.data: expected a JSONL file of records, found no file "
                          f"at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [_record(row, i, text_field, pii_field) for i, row in enumerate(rows, 1)]
    if not records:
        raise ConfigError(f"audit.data: {path} holds no records")
    return records


def _record(row: object, line: int, text_field: str, pii_field: str) -> Record:
    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
        raise ConfigError(f"audit.data line {line}: expected an object with a string "
                          f"{text_field!r}, found {str(row)[:80]!r}")
    pii = row.get(pii_field, [])
    if not isinstance(pii, list) or not all(isinstance(v, str) and v for v in pii):
        raise ConfigError(f"audit.data line {line}: {pii_field!r} must be a list of "
                          f"non-empty strings, found {pii!r}")
    missing = [v for v in pii if v not in row[text_field]]
    if missing:
        raise ConfigError(f"audit.data line {line}: PII values {missing} do not occur in "
                          f"the text, so their recovery cannot be scored")
    return Record(text=row[text_field], pii=tuple(pii))


def write_client_data(records: list[Record], path: Path) -> Path:
    """The JSONL a fedpeft run trains on (``data=local``): the audit prompt as the
    question and the record as the answer, so the record is what clients learn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": PROMPT, "response": r.text}) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path
