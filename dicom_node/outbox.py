"""The durable outbox: every result file and destination is a delivery; a thread per
destination sends what is due to it, so that a destination that is down or silent
(each attempt waits up to ``[outbox] timeout_s``) holds back no other, and a
destination that is down is retried with backoff, with nothing dropped. Deliveries
are unique per (destination, SOP Instance UID), so a re-run that produces the same
UIDs does not send twice. What is due to a destination no longer configured fails,
with the reason.

Each delivery is marked sent the moment its C-STORE or STOW-RS part succeeds
(the sender reports it before sending the next), so a crash or a destination
lost mid-batch re-sends at most the one instance that was in flight. This is
where a delivery's failure becomes a retry or a permanent failure.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from dicom_node.db import Database, Delivery
from dicom_node.diskfull import Waiting
from dicom_node.errors import DeliveryError
from dicom_node.loops import Loops
from dicom_node.senders import InFlight, Refusal, send
from dicom_node.settings import Settings

log = logging.getLogger(__name__)
BATCH = 64
# (destination, delivery, sent, reason, permanent): the audit trail and the metrics
DeliveryObserver = Callable[[str, Delivery, bool, str, bool], None]


class Outbox(Loops):
    def __init__(
        self,
        db: Database,
        settings: Settings,
        on_delivery: DeliveryObserver = lambda *_: None,
    ) -> None:
        super().__init__()
        self.db = db
        self.settings = settings
        self.on_delivery = on_delivery
        names = [d.name for d in settings.destinations]
        # One thread per destination; one more for deliveries to a destination that is
        # no longer configured (they fail, with the reason).
        self.threads = [
            threading.Thread(target=self._loop, args=(n,), name=f"outbox-{n}", daemon=True)
            for n in names
        ] + [threading.Thread(target=self._loop, args=(None,), name="outbox", daemon=True)]

    def _loop(self, destination: str | None) -> None:
        full = Waiting(f"outbox ({destination or 'other'})", self.db)
        while not self.stop_event.is_set():
            try:
                busy = self.deliver_due(destination)
                full.passed()
            except Exception as exc:  # noqa: BLE001 - a defect must not end the thread
                if full.met(exc):
                    # a delivery made but not recorded is made again at the next try:
                    # not at every poll (the destination would get it a few times a second)
                    self.stop_event.wait(full.delay_s)
                    continue
                log.exception("outbox (%s): unexpected error; going on", destination or "other")
                busy = False
            if not busy:
                self.wake.wait(self.settings.outbox.poll_interval_s)
                self.wake.clear()

    def _defer(self, name: str, batch: list[Delivery], reported: set[int], reason: str) -> None:
        """What the batch did not report goes back, due after its backoff; at once when
        the batch had reached the destination (an object of it was answered, or was in
        flight when the association ended: that one waits its backoff, and the others
        go before it, so that no object holds back those behind it)."""
        rest = [d for d in batch if d.id not in reported]
        for d in rest:
            # Observed before the state moves, as a refusal is (report): whoever
            # sees the retry in the index finds it in the audit trail too.
            self.on_delivery(name, d, False, reason, False)
            self.db.delivery_retry(d, reason, self._delay(d) if not reported else 0.0)
        log.warning("delivery to %s deferred (%d object(s)): %s", name, len(rest), reason)

    def _delay(self, delivery: Delivery) -> float:
        cfg = self.settings.outbox
        return float(min(cfg.backoff_base_s * 2 ** min(delivery.attempts, 20), cfg.backoff_max_s))

    def deliver_due(self, destination: str | None = None) -> bool:
        """Send one batch of what is due to ``destination`` (None: fail what is due to
        destinations no longer configured); True when anything was sent or refused."""
        if destination is not None:
            due = self.db.due_deliveries(BATCH, destination=destination)
            return bool(due) and self._deliver(destination, due) > 0
        configured = [d.name for d in self.settings.destinations]
        stale = self.db.due_deliveries(BATCH, not_to=configured)
        for d in stale:
            self.db.delivery_failed(d, f"destination {d.destination!r} is no longer configured")
        return bool(stale)

    def _deliver(self, name: str, batch: list[Delivery]) -> int:
        dest = next(d for d in self.settings.destinations if d.name == name)
        reported: set[int] = set()

        def report(item: Delivery, refusal: Refusal) -> None:
            reported.add(item.id)
            if refusal is None:
                self.db.delivery_sent(item, getattr(dest, "storage_commitment", False))
                self.on_delivery(name, item, True, "", False)
                return
            if isinstance(refusal, InFlight):
                failed = self.db.delivery_aborted(
                    item, refusal.reason, self._delay(item), self.settings.outbox.max_aborts
                )
                self.on_delivery(name, item, False, failed or refusal.reason, bool(failed))
                if failed:
                    log.error("%s: %s given up: %s", name, item.sop_instance_uid, failed)
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
