"""Storage commitment requests: what the node holds of each, and its result's delivery."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dicom_node.db.core import Core
from dicom_node.db.records import Commitment, CommitmentState, now, one_or_none_of

# PS3.4 J.3.3.1.1.2: Failure Reason (0008,1197)
NO_SUCH_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
_CHUNK = 500  # SQLite's bound on the variables of one statement is 999 on old builds


class DuplicateTransaction(Exception):
    """The Transaction UID is another sender's request."""


class TooManyListed(Exception):
    """The sender's requests not yet reported list too many instances already."""


class Commitments(Core):
    """Storage commitment: pending -> reported | given_up; a request repeated by its
    sender (the same Transaction UID) is answered again, from what is held then."""

    def request_commitment(
        self,
        transaction_uid: str,
        calling_aet: str,
        references: Sequence[tuple[str, str]],
        max_listed: int | None = None,
    ) -> Commitment:
        """Record a request and what the index holds of ``references`` (SOP Class and
        Instance UIDs) in one transaction: an instance indexed with that class is
        committed (its file was written, synced and renamed before it was indexed), one
        indexed with another class fails 0x0119, one not held 0x0112. Raises
        ``DuplicateTransaction`` when the UID is another sender's request.

        ``max_listed`` bounds what one sender's rows hold (a sender could otherwise
        grow the index without end with requests of new Transaction UIDs): past it,
        its oldest settled requests are forgotten, and a request is refused
        (``TooManyListed``) when its requests still to be reported alone pass it."""
        with self._tx() as con:
            row = con.execute(
                "SELECT calling_aet FROM commitments WHERE transaction_uid=?", (transaction_uid,)
            ).fetchone()
            if row is not None and row["calling_aet"] != calling_aet:
                raise DuplicateTransaction(transaction_uid)
            held: dict[str, str] = {}
            uids = sorted({sop for _, sop in references})
            for i in range(0, len(uids), _CHUNK):
                part = uids[i : i + _CHUNK]
                held.update(
                    (r["sop_instance_uid"], r["sop_class_uid"])
                    for r in con.execute(
                        "SELECT sop_instance_uid, sop_class_uid FROM instances "
                        f"WHERE sop_instance_uid IN ({','.join('?' * len(part))})",
                        part,
                    )
                )
            committed: list[tuple[str, str]] = []
            failed: list[tuple[str, str, int]] = []
            for sop_class, sop in references:
                if held.get(sop) == sop_class:
                    committed.append((sop_class, sop))
                else:
                    why = NO_SUCH_INSTANCE if sop not in held else CLASS_INSTANCE_CONFLICT
                    failed.append((sop_class, sop, why))
            at = now()
            con.execute(
                "INSERT OR REPLACE INTO commitments (transaction_uid, calling_aet, "
                "requested_at, committed, failed, listed, state, attempts, not_before) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    transaction_uid,
                    calling_aet,
                    at,
                    json.dumps(committed),
                    json.dumps(failed),
                    len(references),
                    CommitmentState.PENDING,
                    at,
                ),
            )
            if max_listed is not None:
                self._keep_within(con, calling_aet, max_listed)
        return Commitment(transaction_uid, calling_aet, at, committed, failed, 0)

    @staticmethod
    def _keep_within(con: Any, calling_aet: str, max_listed: int) -> None:
        rows = con.execute(
            "SELECT transaction_uid, state, listed FROM commitments WHERE calling_aet=? "
            "ORDER BY requested_at",
            (calling_aet,),
        ).fetchall()
        total = sum(r["listed"] for r in rows)
        pending = sum(r["listed"] for r in rows if r["state"] == CommitmentState.PENDING)
        if pending > max_listed:
            raise TooManyListed(pending)
        for r in rows:
            if total <= max_listed:
                break
            if r["state"] != CommitmentState.PENDING:
                con.execute(
                    "DELETE FROM commitments WHERE transaction_uid=?", (r["transaction_uid"],)
                )
                total -= r["listed"]

    def due_commitments(
        self, limit: int, requester: str | None = None, not_of: Sequence[str] = ()
    ) -> list[Commitment]:
        """Results due to be reported now, oldest first: to ``requester`` when given,
        else to any requester but those in ``not_of``."""
        which, params = one_or_none_of("calling_aet", requester, not_of)
        rows = self.query(
            f"SELECT * FROM commitments WHERE state=? AND not_before <= ? AND {which} "
            "ORDER BY requested_at LIMIT ?",
            (CommitmentState.PENDING, now(), *params, limit),
        )
        return [
            Commitment(
                r["transaction_uid"],
                r["calling_aet"],
                r["requested_at"],
                [tuple(c) for c in json.loads(r["committed"])],  # type: ignore[misc]
                [tuple(f) for f in json.loads(r["failed"])],  # type: ignore[misc]
                r["attempts"],
            )
            for r in rows
        ]

    def commitment_reported(self, c: Commitment) -> None:
        self._commitment_moved(c, CommitmentState.REPORTED, None, 0.0)

    def commitment_retry(self, c: Commitment, reason: str, delay_s: float) -> None:
        self._commitment_moved(c, CommitmentState.PENDING, reason, delay_s)

    def commitment_given_up(self, c: Commitment, reason: str) -> None:
        self._commitment_moved(c, CommitmentState.GIVEN_UP, reason, 0.0)

    def _commitment_moved(
        self, c: Commitment, state: CommitmentState, reason: str | None, delay_s: float
    ) -> None:
        """Only the request it was read from: one its sender repeated meanwhile (a new
        ``requested_at``) is reported again."""
        with self._tx() as con:
            con.execute(
                "UPDATE commitments SET state=?, attempts=attempts+1, error=?, not_before=?, "
                "reported_at=? WHERE transaction_uid=? AND requested_at=? AND state=?",
                (
                    state,
                    reason,
                    now() + delay_s,
                    now() if state == CommitmentState.REPORTED else None,
                    c.transaction_uid,
                    c.requested_at,
                    CommitmentState.PENDING,
                ),
            )

    def forget_commitments(self, before: float) -> int:
        """Delete the rows of requests settled (reported or given up) before ``before``."""
        with self._tx() as con:
            return con.execute(
                "DELETE FROM commitments WHERE state!=? AND requested_at < ?",
                (CommitmentState.PENDING, before),
            ).rowcount
