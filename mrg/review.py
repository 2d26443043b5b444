"""Review sessions: one verdict per case and reviewer, saved at once to SQLite (WAL).

A case is keyed by its dataset id (``dataset:<split>:<id>``) or by a content hash of the
uploaded pixels (``sha256:<hex>``), never by anything from the DICOM header, so the store
holds no patient identifiers. Saving the same case again for the same session, mode and
reviewer replaces the earlier verdict; everything can be exported as CSV or JSON.

A blinded A/B session shows two modes as "Report A" and "Report B" in a per-case order
(``blinding_for``: seeded by session and case, stored on first use); the reviewer's
preference is stored as seen (A, B or equal) and unblinded only by ``preferences``, for
exports and the summary.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

VERDICTS = ("acceptable", "minor error", "major error")
ERROR_CATEGORIES = (
    "missed finding",
    "false finding",
    "wrong location or laterality",
    "wrong severity",
    "other",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    case_key TEXT NOT NULL,
    mode TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    verdict TEXT NOT NULL,
    categories TEXT NOT NULL,
    note TEXT NOT NULL,
    generated TEXT NOT NULL,
    reference TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    created_at TEXT NOT NULL,
    gate TEXT NOT NULL DEFAULT '{}',
    UNIQUE (session, case_key, mode, reviewer)
);
CREATE TABLE IF NOT EXISTS blinding (
    session TEXT NOT NULL,
    case_key TEXT NOT NULL,
    report_a TEXT NOT NULL,
    report_b TEXT NOT NULL,
    PRIMARY KEY (session, case_key)
);
CREATE TABLE IF NOT EXISTS preferences (
    session TEXT NOT NULL,
    case_key TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    preferred TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (session, case_key, reviewer)
);
"""
PREFERENCES = ("A", "B", "equal")


class ReviewError(ValueError):
    """A review cannot be saved as given; the message says which field is wrong."""


@dataclass
class Review:
    session: str
    case_key: str
    mode: str
    reviewer: str
    verdict: str
    categories: list[str] = field(default_factory=list)
    note: str = ""
    generated: str = ""
    reference: str = ""
    checkpoint: str = ""
    created_at: str = ""
    gate: dict = field(default_factory=dict)  # the chest-radiograph gate's verdict and scores

    def validate(self) -> Review:
        if not self.reviewer.strip():
            raise ReviewError("Please enter a reviewer name.")
        if not self.case_key:
            raise ReviewError("Load a study before saving a review.")
        if self.verdict not in VERDICTS:
            raise ReviewError(f"Choose a verdict: {', '.join(VERDICTS)}.")
        unknown = set(self.categories) - set(ERROR_CATEGORIES)
        if unknown:
            raise ReviewError(f"Unknown error categories: {', '.join(sorted(unknown))}.")
        if self.verdict == "acceptable" and self.categories:
            raise ReviewError(
                "An acceptable report has no error categories; untick them or change the verdict."
            )
        return self


@dataclass(frozen=True)
class Blinding:
    """Which mode wrote "Report A" and which "Report B" for one case of a blinded session."""

    report_a: str
    report_b: str

    def mode_of(self, preferred: str) -> str | None:
        """The mode behind a preference ``A``/``B``; None for ``equal``."""
        return {"A": self.report_a, "B": self.report_b, "equal": None}[preferred]


def blinding_for(session: str, case_key: str, modes: tuple[str, str]) -> Blinding:
    """A per-case coin seeded by (session, case): the same case in the same session always
    gets the same order, different cases get either order with equal chance."""
    coin = hashlib.sha256(f"blinding:{session}:{case_key}".encode()).digest()[0] % 2
    first, second = modes if coin == 0 else modes[::-1]
    return Blinding(first, second)


class ReviewStore:
    """Thread-safe SQLite store; one connection per call, WAL so readers never block the writer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(reviews)")}
            if "gate" not in columns:  # a store written before the gate was recorded
                db.execute("ALTER TABLE reviews ADD COLUMN gate TEXT NOT NULL DEFAULT '{}'")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def save(self, review: Review) -> Review:
        review.validate()
        review.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        row = asdict(review)
        row["categories"], row["gate"] = json.dumps(review.categories), json.dumps(review.gate)
        columns = ", ".join(row)
        with self._lock, self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO reviews ({columns}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
        return review

    def reviews(self, session: str | None = None) -> list[Review]:
        query, args = "SELECT * FROM reviews", ()
        if session:
            query, args = query + " WHERE session = ?", (session,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY id", args).fetchall()
        out = []
        for row in rows:
            data = {k: row[k] for k in row.keys() if k != "id"}  # noqa: SIM118 (sqlite3.Row is not a dict)
            data["categories"], data["gate"] = (
                json.loads(data["categories"]),
                json.loads(data["gate"]),
            )
            out.append(Review(**data))
        return out

    def blinding(self, session: str, case_key: str, modes: tuple[str, str]) -> Blinding:
        """The case's A/B order in ``session``: stored the first time it is asked for, so an
        export and a restart see the order the reviewer saw."""
        proposed = blinding_for(session, case_key, modes)
        with self._lock, self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO blinding VALUES (?, ?, ?, ?)",
                (session, case_key, proposed.report_a, proposed.report_b),
            )
            row = db.execute(
                "SELECT report_a, report_b FROM blinding WHERE session = ? AND case_key = ?",
                (session, case_key),
            ).fetchone()
        return Blinding(row["report_a"], row["report_b"])

    def save_preference(self, session: str, case_key: str, reviewer: str, preferred: str) -> None:
        """``preferred``: ``A``, ``B`` or ``equal``, as the reviewer saw the case."""
        if not reviewer.strip():
            raise ReviewError("Please enter a reviewer name.")
        if not case_key:
            raise ReviewError("Load a study before saving a preference.")
        if preferred not in PREFERENCES:
            raise ReviewError(f"Choose a preference: {', '.join(PREFERENCES)}.")
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._lock, self._connect() as db:
            if not db.execute(
                "SELECT 1 FROM blinding WHERE session = ? AND case_key = ?", (session, case_key)
            ).fetchone():
                raise ReviewError("This case was not shown blinded in this session.")
            db.execute(
                "INSERT OR REPLACE INTO preferences VALUES (?, ?, ?, ?, ?)",
                (session, case_key, reviewer, preferred, created),
            )

    def preferences(self, session: str) -> list[dict]:
        """Every preference of ``session``, unblinded: ``preferred_mode`` is None for equal."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT p.case_key, p.reviewer, p.preferred, b.report_a, b.report_b "
                "FROM preferences p JOIN blinding b USING (session, case_key) "
                "WHERE p.session = ? ORDER BY p.rowid",
                (session,),
            ).fetchall()
        return [
            {
                "case_key": row["case_key"],
                "reviewer": row["reviewer"],
                "preferred": row["preferred"],
                "report_a": row["report_a"],
                "report_b": row["report_b"],
                "preferred_mode": Blinding(row["report_a"], row["report_b"]).mode_of(
                    row["preferred"]
                ),
            }
            for row in rows
        ]

    def reviewed_keys(self, session: str | None = None) -> set[str]:
        return {r.case_key for r in self.reviews(session)}

    def export_csv(self, path: str | Path, session: str | None = None) -> Path:
        path = Path(path)
        fields = list(Review.__dataclass_fields__)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for review in self.reviews(session):
                row = asdict(review)
                row["categories"] = "; ".join(review.categories)
                row["gate"] = json.dumps(review.gate)
                writer.writerow(row)
        return path

    def export_json(self, path: str | Path, session: str | None = None) -> Path:
        path = Path(path)
        path.write_text(json.dumps([asdict(r) for r in self.reviews(session)], indent=2) + "\n")
        return path
