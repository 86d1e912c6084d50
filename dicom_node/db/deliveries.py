"""Deliveries: the outbox, one row per result file and destination."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicom_node.db.core import Core
from dicom_node.db.records import (
    Delivery,
    DeliveryState,
    now,
)


class Deliveries(Core):
    """Deliveries: the outbox state machine."""

    def due_deliveries(
        self, limit: int, destination: str | None = None, not_to: Sequence[str] = ()
    ) -> list[Delivery]:
        """Pending deliveries due now, oldest first: to ``destination`` when given, else
        to any destination but those in ``not_to``."""
        if destination is not None:
            which, params = "destination = ?", [destination]
        else:
            which, params = f"destination NOT IN ({','.join('?' * len(not_to))})", list(not_to)
        rows = self.query(
            f"SELECT * FROM outbox WHERE state=? AND not_before <= ? AND {which} "
            "ORDER BY id LIMIT ?",
            (DeliveryState.PENDING, now(), *params, limit),
        )
        return [
            Delivery(
                r["id"],
                r["destination"],
                Path(r["path"]),
                r["sop_class_uid"],
                r["sop_instance_uid"],
                r["attempts"],
            )
            for r in rows
        ]

    def delivery_sent(self, delivery: Delivery) -> None:
        with self._tx() as con:
            con.execute(
                "UPDATE outbox SET state=?, sent_at=?, attempts=attempts+1, error=NULL "
                "WHERE id=? AND state=?",
                (DeliveryState.SENT, now(), delivery.id, DeliveryState.PENDING),
            )

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
