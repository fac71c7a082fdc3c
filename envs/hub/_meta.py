"""The EnvHub's metadata: one SQLite table of env versions.

One connection per store, shared by the threads of the process under a lock (SQLite itself
serialises writers across processes; WAL lets readers run alongside). ``seq`` is a global push
counter: the latest version of a name is the one pushed last, whatever its label says.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rock_serve.envs.hub._spec import EnvRecord
from rock_serve.errors import Conflict, NotFound

__all__ = ["MetadataStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS env_versions (
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record TEXT NOT NULL,
    bundle_sha256 TEXT,
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS env_versions_bundle ON env_versions (bundle_sha256);
CREATE INDEX IF NOT EXISTS env_versions_seq ON env_versions (name, seq);
"""


class MetadataStore:
    """Env versions in a SQLite file (or ``:memory:``)."""

    def __init__(self, path: Path | str) -> None:
        """Open (and create) the database at ``path``."""
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Autocommit mode: transactions are explicit (see transaction()).
        self._db = sqlite3.connect(
            self.path, timeout=30, check_same_thread=False, isolation_level=None
        )
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction (``BEGIN IMMEDIATE``), under the lock."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _record(row: tuple[str]) -> EnvRecord:
        return EnvRecord.model_validate_json(row[0])

    def put(
        self, record: EnvRecord, *, replace: bool = False
    ) -> tuple[EnvRecord, EnvRecord | None]:
        """Insert a version; with ``replace``, an existing (name, version) is overwritten.

        Pushing a record equal to the stored one (push time aside) is a no-op that returns the
        stored record.

        Returns:
            The stored record and the one it replaced (None if none was replaced).

        Raises:
            Conflict: the version exists with other content and ``replace`` is false.
        """
        body = record.model_dump(mode="json", exclude={"pushed_at"})
        existing: EnvRecord | None = None
        with self.transaction() as db:
            row = db.execute(
                "SELECT record FROM env_versions WHERE name = ? AND version = ?",
                (record.name, record.version),
            ).fetchone()
            if row is not None:
                existing = self._record(row)
                if existing.model_dump(mode="json", exclude={"pushed_at"}) == body:
                    return existing, None
                if not replace:
                    raise Conflict(
                        f"{record.name} version {record.version} exists with other content; "
                        "push a new version or replace it",
                        name=record.name,
                        version=record.version,
                    )
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM env_versions").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO env_versions (name, version, seq, record, bundle_sha256)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    record.name,
                    record.version,
                    seq,
                    json.dumps(record.model_dump(mode="json")),
                    record.bundle_sha256,
                ),
            )
        return record, existing

    def get(self, name: str, version: str | None = None) -> EnvRecord:
        """One version; the latest pushed when ``version`` is None.

        Raises:
            NotFound: no such env or version.
        """
        with self._lock:
            if version is None:
                row = self._db.execute(
                    "SELECT record FROM env_versions WHERE name = ? ORDER BY seq DESC LIMIT 1",
                    (name,),
                ).fetchone()
            else:
                row = self._db.execute(
                    "SELECT record FROM env_versions WHERE name = ? AND version = ?",
                    (name, version),
                ).fetchone()
        if row is None:
            what = name if version is None else f"{name} version {version}"
            raise NotFound(f"no env {what} in the hub", name=name)
        return self._record(row)

    def versions(self, name: str) -> list[EnvRecord]:
        """Every version of ``name``, newest first (empty if none)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT record FROM env_versions WHERE name = ? ORDER BY seq DESC", (name,)
            ).fetchall()
        return [self._record(r) for r in rows]

    def list(self, *, all_versions: bool = False) -> builtins.list[EnvRecord]:
        """The latest version of every name (or every version), sorted by name."""
        with self._lock:
            if all_versions:
                rows = self._db.execute(
                    "SELECT record FROM env_versions ORDER BY name, seq DESC"
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT record FROM env_versions AS v WHERE seq = "
                    "(SELECT MAX(seq) FROM env_versions WHERE name = v.name) ORDER BY name"
                ).fetchall()
        return [self._record(r) for r in rows]

    def delete(
        self, db: sqlite3.Connection, name: str, version: str | None
    ) -> builtins.list[EnvRecord]:
        """Delete one version (or all of ``name``) inside the caller's transaction.

        Raises:
            NotFound: nothing matched.
        """
        if version is None:
            rows = db.execute("SELECT record FROM env_versions WHERE name = ?", (name,)).fetchall()
            db.execute("DELETE FROM env_versions WHERE name = ?", (name,))
        else:
            rows = db.execute(
                "SELECT record FROM env_versions WHERE name = ? AND version = ?", (name, version)
            ).fetchall()
            db.execute("DELETE FROM env_versions WHERE name = ? AND version = ?", (name, version))
        if not rows:
            what = name if version is None else f"{name} version {version}"
            raise NotFound(f"no env {what} in the hub", name=name)
        return [self._record(r) for r in rows]

    def references(self, db: sqlite3.Connection, sha256: str) -> int:
        """How many versions use the bundle ``sha256`` (inside the caller's transaction)."""
        (count,) = db.execute(
            "SELECT COUNT(*) FROM env_versions WHERE bundle_sha256 = ?", (sha256,)
        ).fetchone()
        return int(count)
