"""The durable outbox: every result file and destination is a delivery; a thread
sends what is due, and a destination that is down is retried with backoff, with
nothing dropped. Deliveries are unique per (destination, SOP Instance UID), so a
re-run that produces the same UIDs does not send twice.

Each delivery is marked sent the moment its C-STORE or STOW-RS part succeeds
(the sender reports it before sending the next), so a crash or a destination
lost mid-batch re-sends at most the one instance that was in flight. This is
where a delivery's failure becomes a retry or a permanent failure.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable

from dicom_node.db import Database, Delivery
from dicom_node.errors import DeliveryError
from dicom_node.senders import Refusal, send
from dicom_node.settings import Settings

log = logging.getLogger(__name__)
BATCH = 64
# (destination, delivery, sent, reason, permanent): the audit trail and the metrics
DeliveryObserver = Callable[[str, Delivery, bool, str, bool], None]


class Outbox:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        on_delivery: DeliveryObserver = lambda *_: None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.on_delivery = on_delivery
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="outbox", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.wake.set()
        self.thread.join(timeout)

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            if not self.deliver_due():
                self.wake.wait(self.settings.outbox.poll_interval_s)
                self.wake.clear()

    def _defer(self, name: str, batch: list[Delivery], reported: set[int], reason: str) -> None:
        """What the batch did not report goes back, due after its backoff."""
        rest = [d for d in batch if d.id not in reported]
        for d in rest:
            # Observed before the state moves, as a refusal is (report): whoever
            # sees the retry in the index finds it in the audit trail too.
            self.on_delivery(name, d, False, reason, False)
            self.db.delivery_retry(d, reason, self._delay(d))
        log.warning("delivery to %s deferred (%d object(s)): %s", name, len(rest), reason)

    def _delay(self, delivery: Delivery) -> float:
        cfg = self.settings.outbox
        return float(min(cfg.backoff_base_s * 2 ** min(delivery.attempts, 20), cfg.backoff_max_s))

    def deliver_due(self) -> bool:
        """Send one batch per destination of what is due; True when anything was sent."""
        by_dest: dict[str, list[Delivery]] = defaultdict(list)
        for d in self.db.due_deliveries(BATCH * 4):
            by_dest[d.destination].append(d)
        sent = 0
        for name, due in by_dest.items():
            sent += self._deliver(name, due[:BATCH])
        return sent > 0

    def _deliver(self, name: str, batch: list[Delivery]) -> int:
        dest = next((d for d in self.settings.destinations if d.name == name), None)
        if dest is None:
            for d in batch:
                self.db.delivery_failed(d, f"destination {name!r} is no longer configured")
            return 0
        reported: set[int] = set()

        def report(item: Delivery, refusal: Refusal) -> None:
            reported.add(item.id)
            if refusal is None:
                self.db.delivery_sent(item)
                self.on_delivery(name, item, True, "", False)
                return
            permanent, reason = refusal
            self.on_delivery(name, item, False, reason, permanent)
            if permanent:
                self.db.delivery_failed(item, reason)
                log.error("%s refused %s: %s", name, item.sop_instance_uid, reason)
            else:
                self.db.delivery_retry(item, reason, self._delay(item))

        try:
            send(dest, batch, self.settings.ae_title, self.settings.outbox.timeout_s, report)
        except (DeliveryError, OSError) as exc:
            self._defer(name, batch, reported, str(exc))
        except Exception as exc:  # noqa: BLE001 - a defect must not end the outbox's thread
            log.exception("delivery to %s failed unexpectedly", name)
            self._defer(name, batch, reported, f"internal error: {type(exc).__name__}: {exc}")
        # refusals count as progress too: the batch moved on
        log.info("delivered %d of %d object(s) to %s", len(reported), len(batch), name)
        return len(reported)
