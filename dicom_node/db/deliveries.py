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
