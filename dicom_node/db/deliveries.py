"""Deliveries: the outbox, one row per result file and destination."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from dicom_node.db.core import Core
from dicom_node.db.records import (
    Delivery,
    DeliveryState,
    now,
    one_or_none_of,
)


def _delivery(r: sqlite3.Row) -> Delivery:
    return Delivery(
        r["id"],
        r["destination"],
        Path(r["path"]),
        r["sop_class_uid"],
        r["sop_instance_uid"],
        r["attempts"],
    )


# a result's storage commitment by its destination (outbox.commitment)
AWAITING, COMMITTED, GIVEN_UP = "awaiting", "committed", "given_up"


class Deliveries(Core):
    """Deliveries: the outbox state machine."""

    def due_deliveries(
        self, limit: int, destination: str | None = None, not_to: Sequence[str] = ()
    ) -> list[Delivery]:
        """Pending deliveries due now, oldest first: to ``destination`` when given, else
        to any destination but those in ``not_to``."""
        which, params = one_or_none_of("destination", destination, not_to)
        rows = self.query(
            f"SELECT * FROM outbox WHERE state=? AND not_before <= ? AND {which} "
            "ORDER BY id LIMIT ?",
            (DeliveryState.PENDING, now(), *params, limit),
        )
        return [_delivery(r) for r in rows]

    def delivery_sent(self, delivery: Delivery, commitment: bool = False) -> None:
        """Sent; ``commitment``: to a destination that is to commit to it (its
        storage commitment is then awaited, and the result's files kept until it is)."""
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET state=?, sent_at=?, attempts=attempts+1, error=NULL, "
                "commitment=?, commit_uid=NULL, commit_not_before=NULL WHERE id=? AND state=?",
                (
                    DeliveryState.SENT,
                    now(),
                    AWAITING if commitment else None,
                    delivery.id,
                    DeliveryState.PENDING,
                ),
            )

    # -- storage commitment of what was sent (the node as SCU) -------------------
    def awaiting_commitment(self, destination: str, limit: int) -> list[Delivery]:
        """Results sent to ``destination`` whose commitment is to be asked for now (never
        asked, or asked without an answer in time, or the asking failed), oldest first."""
        rows = self.query(
            "SELECT * FROM outbox WHERE commitment=? AND destination=? AND state=? "
            "AND COALESCE(commit_not_before, 0) <= ? ORDER BY id LIMIT ?",
            (AWAITING, destination, DeliveryState.SENT, now(), limit),
        )
        return [_delivery(r) for r in rows]

    def commitment_asked(self, ids: Sequence[int], transaction_uid: str, wait_s: float) -> None:
        """Asked under ``transaction_uid``; asked again after ``wait_s`` without an answer."""
        self._commit_update(ids, transaction_uid, now() + wait_s)

    def commitment_not_asked(self, ids: Sequence[int], delay_s: float) -> None:
        """The asking failed (the destination down): again after ``delay_s``."""
        self._commit_update(ids, None, now() + delay_s)

    def _commit_update(self, ids: Sequence[int], uid: str | None, not_before: float) -> None:
        with self._tx() as con:
            for i in range(0, len(ids), 500):
                part = list(ids[i : i + 500])
                con.execute(
                    "UPDATE outbox SET commit_uid=?, commit_not_before=? WHERE commitment=? "
                    f"AND id IN ({','.join('?' * len(part))})",
                    (uid, not_before, AWAITING, *part),
                )

    def commitment_result(
        self,
        transaction_uid: str,
        destinations: Sequence[str],
        committed: Sequence[str],
        failed: dict[str, str],
        max_failures: int,
    ) -> tuple[int, int, int]:
        """A destination's storage commitment result under ``transaction_uid`` (only
        rows asked under it of ``destinations``, the ones whose AE title reported it):
        the SOP Instance UIDs ``committed`` are; those ``failed`` (with why) are sent
        again, or fail at their ``max_failures``-th failure. Returns (committed,
        sent again, failed); (0, 0, 0) when the transaction is none of theirs."""
        if not destinations:
            return 0, 0, 0
        marks = ",".join("?" * len(destinations))
        done = again = given = 0
        with self._tx() as con:
            rows = con.execute(
                f"SELECT id, sop_instance_uid, commit_failures FROM outbox WHERE commit_uid=? "
                f"AND commitment=? AND destination IN ({marks})",
                (transaction_uid, AWAITING, *destinations),
            ).fetchall()
            ok = set(committed)
            for r in rows:
                sop = r["sop_instance_uid"]
                if sop in ok:
                    con.execute(
                        "UPDATE outbox SET commitment=?, commit_not_before=NULL WHERE id=?",
                        (COMMITTED, r["id"]),
                    )
                    done += 1
                elif sop in failed:
                    failures = r["commit_failures"] + 1
                    why = f"not committed to ({failed[sop]}), {failures} time(s)"
                    if failures < max_failures:
                        con.execute(
                            "UPDATE outbox SET state=?, commitment=NULL, commit_uid=NULL, "
                            "commit_not_before=NULL, commit_failures=?, error=?, not_before=? "
                            "WHERE id=?",
                            (DeliveryState.PENDING, failures, why + ": sent again", now(), r["id"]),
                        )
                        again += 1
                    else:
                        con.execute(
                            "UPDATE outbox SET state=?, commitment=NULL, commit_failures=?, "
                            "error=? WHERE id=?",
                            (DeliveryState.FAILED, failures, why + ": given up", r["id"]),
                        )
                        given += 1
                # one the result does not name stays awaited: asked again after the wait
        return done, again, given

    def commitment_no_longer_awaited(self, committing: Sequence[str]) -> int:
        """Results awaiting the commitment of a destination not among ``committing``
        (no longer configured, or no longer asked to commit): given up, so that their
        files do not wait for ever."""
        marks = ",".join("?" * len(committing))
        with self._tx() as con:
            return con.execute(
                "UPDATE outbox SET commitment=?, error=? WHERE commitment=? "
                f"AND destination NOT IN ({marks})",
                (
                    GIVEN_UP,
                    "its destination is no longer asked to commit (storage_commitment)",
                    AWAITING,
                    *committing,
                ),
            ).rowcount

    def results_not_committed(self, destination: str, sent_before: float, reason: str) -> int:
        """Results sent to ``destination`` before ``sent_before`` and still not committed
        to: given up (their files may go), with the reason."""
        with self._tx() as con:
            return con.execute(
                "UPDATE outbox SET commitment=?, error=? WHERE commitment=? AND destination=? "
                "AND state=? AND sent_at < ?",
                (GIVEN_UP, reason, AWAITING, destination, DeliveryState.SENT, sent_before),
            ).rowcount

    def delivery_retry(self, delivery: Delivery, reason: str, delay_s: float) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET attempts=attempts+1, error=?, not_before=? WHERE id=? AND state=?",
                (reason, now() + delay_s, delivery.id, DeliveryState.PENDING),
            )

    def delivery_aborted(
        self, delivery: Delivery, reason: str, delay_s: float, max_aborts: int
    ) -> str | None:
        """The destination ended the association with this object in flight (or failed
        on it). Counted when it stored another object since the last such end (the
        first counts): a destination that takes nothing is down, not choking on this
        object. At ``max_aborts`` the delivery fails: returns the reason, else None
        (retried after ``delay_s``)."""
        with self._tx() as con:
            row = con.execute(
                "SELECT aborts, aborted_at FROM outbox WHERE id=? AND state=?",
                (delivery.id, DeliveryState.PENDING),
            ).fetchone()
            if row is None:
                return None
            others = (
                row["aborted_at"] is None
                or con.execute(
                    "SELECT 1 FROM outbox WHERE destination=? AND state=? AND sent_at > ? LIMIT 1",
                    (delivery.destination, DeliveryState.SENT, row["aborted_at"]),
                ).fetchone()
            )
            aborts = row["aborts"] + (1 if others else 0)
            if aborts < max_aborts:
                con.execute(
                    "UPDATE outbox SET attempts=attempts+1, error=?, not_before=?, aborts=?, "
                    "aborted_at=? WHERE id=?",
                    (reason, now() + delay_s, aborts, now(), delivery.id),
                )
                return None
            failed = (
                f"{reason.partition(':')[0]} on {aborts} attempts, the destination storing "
                "other objects in between: it does not take this object (reprocess the run "
                "to send it again once it does)"
            )
            con.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, error=?, aborts=?, "
                "aborted_at=? WHERE id=?",
                (DeliveryState.FAILED, failed, aborts, now(), delivery.id),
            )
            return failed

    def delivery_failed(self, delivery: Delivery, reason: str) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET state=?, attempts=attempts+1, error=? WHERE id=? AND state=?",
                (DeliveryState.FAILED, reason, delivery.id, DeliveryState.PENDING),
            )

    def pending_deliveries(self) -> int:
        return int(
            self.query("SELECT COUNT(*) n FROM outbox WHERE state=?", (DeliveryState.PENDING,))[0][
                "n"
            ]
        )
