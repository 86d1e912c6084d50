"""The durable outbox: every result file and destination is a row; a delivery thread
sends what is due, and a destination that is down is retried with backoff, with
nothing dropped. Rows are unique per (destination, SOP Instance UID), so a
re-run that produces the same deterministic UIDs does not send twice.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from pathlib import Path

from dicom_node.db import Database, now
from dicom_node.errors import DeliveryError
from dicom_node.senders import Item, send
from dicom_node.settings import Settings

log = logging.getLogger(__name__)
BATCH = 64


class Outbox:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="outbox", daemon=True)

    def add(
        self,
        job_id: int,
        destination: str,
        path: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        series_uid: str,
        resend: bool = False,
    ) -> bool:
        """Queue a file; False when this destination already has (or will get) it."""
        t = now()
        with self.db.transaction() as con:
            row = con.execute(
                "SELECT id, state FROM outbox WHERE destination=? AND sop_instance_uid=?",
                (destination, sop_instance_uid),
            ).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO outbox (job_id, destination, sop_instance_uid, sop_class_uid, series_uid,"
                    " path, state, not_before, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        job_id,
                        destination,
                        sop_instance_uid,
                        sop_class_uid,
                        series_uid,
                        str(path),
                        "pending",
                        t,
                        t,
                    ),
                )
                self.wake.set()
                return True
            if resend or row["state"] == "failed":
                con.execute(
                    "UPDATE outbox SET job_id=?, path=?, state='pending', attempts=0, not_before=?, "
                    "error=NULL WHERE id=?",
                    (job_id, str(path), t, row["id"]),
                )
                self.wake.set()
                return True
            return False

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.wake.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            sent_any = self.deliver_due()
            if not sent_any:
                self.wake.wait(self.settings.outbox.poll_interval_s)
                self.wake.clear()

    def deliver_due(self) -> bool:
        rows = self.db.query(
            "SELECT * FROM outbox WHERE state='pending' AND not_before <= ? ORDER BY id LIMIT ?",
            (now(), BATCH * 4),
        )
        if not rows:
            return False
        by_dest: dict[str, list] = defaultdict(list)  # type: ignore[type-arg]
        for r in rows:
            by_dest[r["destination"]].append(r)
        progressed = False
        for name, batch in by_dest.items():
            dest = next((d for d in self.settings.destinations if d.name == name), None)
            if dest is None:
                self._mark(
                    batch, failed=f"destination {name!r} is no longer configured", permanent=True
                )
                continue
            items = [
                Item(r["id"], Path(r["path"]), r["sop_class_uid"], r["sop_instance_uid"])
                for r in batch[:BATCH]
            ]
            try:
                outcome = send(dest, items, self.settings.ae_title, self.settings.outbox.timeout_s)
            except (DeliveryError, OSError) as exc:
                self._mark(batch[:BATCH], failed=str(exc), permanent=False)
                continue
            progressed = True
            with self.db.transaction() as con:
                t = now()
                for r in batch[:BATCH]:
                    result = outcome.get(r["id"], (False, "no outcome reported"))
                    if result is None:
                        con.execute(
                            "UPDATE outbox SET state='sent', sent_at=?, attempts=attempts+1,"
                            " error=NULL WHERE id=?",
                            (t, r["id"]),
                        )
                    else:
                        permanent, reason = result
                        self._retry_or_fail(con, r, reason, permanent, t)
            log.info("sent %d object(s) to %s", sum(v is None for v in outcome.values()), name)
        return progressed

    def _retry_or_fail(self, con, row, reason: str, permanent: bool, t: float) -> None:  # type: ignore[no-untyped-def]
        cfg = self.settings.outbox
        if permanent:
            con.execute(
                "UPDATE outbox SET state='failed', attempts=attempts+1, error=? WHERE id=?",
                (reason, row["id"]),
            )
            log.error("%s refused %s: %s", row["destination"], row["sop_instance_uid"], reason)
            return
        delay = min(cfg.backoff_base_s * 2 ** min(row["attempts"], 20), cfg.backoff_max_s)
        con.execute(
            "UPDATE outbox SET attempts=attempts+1, error=?, not_before=? WHERE id=?",
            (reason, t + delay, row["id"]),
        )

    def _mark(self, batch: list, failed: str, permanent: bool) -> None:  # type: ignore[type-arg]
        t = now()
        with self.db.transaction() as con:
            for r in batch:
                self._retry_or_fail(con, r, failed, permanent, t)
        log.warning(
            "delivery to %s deferred (%d object(s)): %s",
            batch[0]["destination"],
            len(batch),
            failed,
        )
