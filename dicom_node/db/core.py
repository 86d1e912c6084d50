"""The SQLite connection (one per thread, WAL), transactions and the schema."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicom_node.db.records import StateError
from dicom_node.db.schema import _MIGRATIONS, POST_MIGRATION, SCHEMA, SCHEMA_VERSION


class Core:
    """The connection, transactions and schema; the parts of the index build on it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self.connect()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)  # idempotent
        with self._tx() as con:
            for table, columns in _MIGRATIONS.items():
                have = {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}
                for name, decl in columns:
                    if name not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
            for statement in filter(str.strip, POST_MIGRATION.split(";")):
                con.execute(statement)
            if con.execute("PRAGMA user_version").fetchone()[0] < 2:
                # schema 1 marked a resend as a destination name suffix, "name!resend"
                for row in con.execute("SELECT id, destinations FROM jobs").fetchall():
                    names = json.loads(row["destinations"])
                    if any(n.endswith("!resend") for n in names):
                        plain = [n.removesuffix("!resend") for n in names]
                        con.execute(
                            "UPDATE jobs SET destinations=?, resend=1 WHERE id=?",
                            (json.dumps(plain), row["id"]),
                        )
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('index_id', ?)",
                (uuid.uuid4().hex[:12],),
            )
            # a write, so only on a new schema (a full disk refuses it: the node would not start)
            if con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- connection ---------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=True
            )
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA synchronous=FULL")  # the index is as durable as the files
            con.execute("PRAGMA busy_timeout=60000")
            self._local.con = con
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self.connect()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        else:
            con.execute("COMMIT")

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:  # type: ignore[type-arg]
        """Read-only SQL for reports and tests; writes go through the methods below."""
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            raise StateError("Database.query is read-only")
        return self.connect().execute(sql, params).fetchall()

    def index_id(self) -> str:
        """A random identity made with the index: workflow IDs of two indexes never meet."""
        return str(self.query("SELECT value FROM meta WHERE key='index_id'")[0]["value"])

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
