"""Rejection notes (IHE IOCM): instances a sender withdraws, and the results made of them.

A suite or PACS that rejects instances (the wrong patient, an unusable run) sends a
Key Object Selection Document whose title is one of the rejection reasons of PS3.16
CID 7011, listing the instances in its Current Requested Procedure Evidence Sequence.
The node stores it like any instance; the router hands it here instead of to the
rules (``Router.route``). Here:

- the runs holding a listed instance are cancelled (``Database.cancel_run``): a run
  still receiving or to be routed is settled, its queued and running jobs fail and
  its results not yet delivered are not delivered, each with the note as the reason;
  and marked rejected (``Database.mark_rejected``): opened again by a later instance,
  or by an operator's reprocess, the router settles it with that reason, unprocessed;
  once the note's run is settled, their files are deleted (``Retention.purge_now``);
- results already delivered are withdrawn in turn: for each destination (and study)
  the node sends its own rejection note, with the same title, listing them, so that a
  PACS that honours IOCM hides them, and one that does not shows the note beside them.

Only who sent a run may reject it (its calling AE, or the sender a forwarder named):
another sender's note leaves it as it is.

Every step can be done again: the node's notes have UIDs derived from the received
note, the run and the destination, and a delivery is queued once per destination
and UID. The received note's run is settled (unrouted, with what was done) last, so
a crash in between repeats the whole at the next start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.db import Database, RunState
from dicom_node.db.jobs import Cancelled
from dicom_node.db.records import ResultFile
from dicom_node.encode.rejection import rejection_note
from dicom_node.processing import write_dataset

log = logging.getLogger(__name__)

# runs and a reason -> (purged, {run: why kept}): ``Retention.purge_now``
Purger = Callable[[list[str], str], tuple[list[str], dict[str, str]]]

# PS3.16 CID 7011, Rejected Object Document Titles (scheme DCM)
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
# A note is read whole (it has no pixel data); one larger than this is not read.
MAX_NOTE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Note:
    """What a Key Object Selection Document says: its title, and the instances it lists."""

    sop_instance_uid: str
    title: tuple[str, str, str]  # (code value, scheme, meaning)
    instances: frozenset[str]

    @property
    def rejection(self) -> bool:
        return self.title[1] == "DCM" and self.title[0] in REJECTION_TITLES

    def describe(self) -> str:
        return f"({self.title[0]}, {self.title[1]}, {self.title[2]!r})"


def read_note(path: Path) -> Note:
    """The title and listed instances of a stored Key Object Selection Document;
    raises ValueError (with what is wrong) for one that cannot be read."""
    size = path.stat().st_size
    if size > MAX_NOTE_BYTES:
        raise ValueError(
            f"a key object selection of {size / 2**20:.1f} MiB is more than the node reads "
            f"({MAX_NOTE_BYTES // 2**20} MiB)"
        )
    ds = dcmread(path)
    titles = ds.get("ConceptNameCodeSequence") or []
    if len(titles) != 1:
        raise ValueError("its Concept Name Code Sequence (the document title) is not one item")
    code = titles[0]
    title = (
        str(code.get("CodeValue", "")).strip(),
        str(code.get("CodingSchemeDesignator", "")).strip(),
        str(code.get("CodeMeaning", "")).strip(),
    )
    listed = {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []
        for series in study.get("ReferencedSeriesSequence") or []
        for sop in series.get("ReferencedSOPSequence") or []
        if sop.get("ReferencedSOPInstanceUID")
    }
    return Note(str(ds.SOPInstanceUID), title, frozenset(listed))


class Rejections:
    """Applies the rejection notes the router hands over."""

    def __init__(
        self,
        db: Database,
        results_dir: Path,
        withdraw: Callable[[Cancelled], None] = lambda _: None,
        purge: Purger = lambda runs, why: ([], {}),
        destinations: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.db = db
        self.results_dir = results_dir
        # the DIMSE destinations' (AE title, name): a note from one that lists results
        # the node delivered to it is a verdict on them, kept as feedback
        self.destinations = list(destinations)
        # stops the running jobs of a cancelled run (the engine's ``withdraw``)
        self.withdraw = withdraw
        # deletes the rejected runs' files (``Retention.purge_now``; a node's results
        # still waiting for delivery, its own rejection notes among them, are kept
        # until delivered)
        self.purge = purge

    def apply(self, run_id: str, path: Path, calling: str, sender: str = "") -> str:
        """Act on the note stored at ``path`` (the only instance of run ``run_id``), sent
        by ``calling`` (for ``sender``, when a forwarder named one), and settle its run;
        returns what was done, which is the run's reason."""
        try:
            note = read_note(path)
        except Exception as exc:  # noqa: BLE001 - a sender's defect becomes the run's state
            reason = f"key object selection cannot be read: {type(exc).__name__}: {exc}"
            self.db.settle_unrouted(run_id, RunState.UNROUTABLE, None, reason)
            log.warning("run %s unroutable: %s", run_id, reason)
            return reason
        rejected: list[str] = []
        if not note.rejection:
            reason = (
                f"a key object selection titled {note.describe()}: not a rejection note "
                "(PS3.16 CID 7011), nothing to do"
            )
        else:
            reason, rejected = self._reject(note, calling, sender or calling)
        if self.db.settle_unrouted(run_id, RunState.UNROUTED, None, reason):
            log.warning("run %s: %s", run_id, reason)
        # Last: the notes of their results are queued, and a crash before this leaves
        # the files to retention, which deletes them in time.
        if rejected:
            _, kept = self.purge(rejected, f"rejected by rejection note {note.sop_instance_uid}")
            for run, why in kept.items():
                log.warning("rejected run %s: its files are kept for now: %s", run, why)
        return reason

    def _reject(self, note: Note, calling: str, sender: str) -> tuple[str, list[str]]:
        """What was done, and the runs rejected."""
        held = self.db.runs_holding(note.instances)
        who = calling if sender == calling else f"{calling} for {sender}"
        head = f"rejection note {note.sop_instance_uid} {note.describe()} from {who}"
        sent_by = {calling, sender}
        if not held:
            feedback = self._feedback(note, calling)
            if feedback:
                return f"{head}: {feedback}", []
            return f"{head}: none of its {len(note.instances)} instance(s) is held here", []
        # Only who sent a run may reject it: another sender could otherwise withdraw a
        # suite's results by listing its instances (an operator cancels with the CLI).
        runs = sorted(r for r, senders in held.items() if senders & sent_by)
        others = sorted(set(held) - set(runs))
        if not runs:
            return (
                f"{head}: its {len(others)} run(s) held here were sent by others: not rejected",
                [],
            )
        why = f"rejected by {head}"
        cancelled_jobs = withdrawn = 0
        failures = []
        for run_id in runs:
            self.db.mark_rejected(run_id, why)
            outcome = self.db.cancel_run(run_id, why)
            if not isinstance(outcome, str):
                self.withdraw(outcome)
                cancelled_jobs += len(outcome.jobs)
            try:
                withdrawn += self._withdraw(note, run_id)
            except Exception as exc:  # noqa: BLE001 - the others are withdrawn all the same
                log.error("run %s: its delivered results cannot be withdrawn: %s", run_id, exc)
                failures.append(f"{run_id}: {type(exc).__name__}: {exc}")
        done = (
            f"{head}: {len(runs)} run(s) ({_some(runs)}) cancelled, "
            f"{cancelled_jobs} job(s) stopped, {withdrawn} delivered result(s) withdrawn "
            "by the node's own rejection notes, their files deleted"
        )
        if others:
            done += f"; {len(others)} run(s) sent by others not rejected ({_some(others)})"
        if failures:
            done += "; results of run(s) that could not be withdrawn (withdraw them at the "
            done += "destination by hand): " + "; ".join(failures)
        return done, runs

    def _feedback(self, note: Note, calling: str) -> str:
        """A note from a destination that lists results the node delivered to it (a
        radiologist rejecting an AI result in the PACS): kept as feedback for their
        jobs' pipeline and model (``result_rejections``); what was kept, or ""."""
        names = [name for aet, name in self.destinations if aet == calling]
        rows = self.db.results_listed(note.instances, names) if names else []
        if not rows:
            return ""
        code, _, meaning = note.title
        self.db.record_result_rejections(note.sop_instance_uid, code, meaning, rows)
        jobs = sorted({f"{r['pipeline']} job {r['job_id']}" for r in rows})
        log.warning(
            "%d result(s) of the node rejected by %s %s: %s",
            len(rows),
            calling,
            note.describe(),
            ", ".join(jobs),
        )
        return (
            f"{len(rows)} of the node's result(s) rejected at the destination, kept as "
            f"feedback ({', '.join(jobs[:10])}{', ...' if len(jobs) > 10 else ''})"
        )

    def _withdraw(self, note: Note, run_id: str) -> int:
        """Queue, for each destination, a rejection note of the run's delivered results."""
        delivered = self.db.delivered_results(run_id)
        if not delivered:
            return 0
        source = self._source_header(run_id)
        count = 0
        for destination, results in delivered.items():
            kos = rejection_note(note.title, source, results, note.sop_instance_uid, destination)
            job_id = results[0].job_id
            path = write_dataset(kos, self.results_dir / str(job_id))
            self.db.queue_note(
                job_id,
                destination,
                ResultFile(
                    path,
                    str(kos.SOPClassUID),
                    str(kos.SOPInstanceUID),
                    str(kos.SeriesInstanceUID),
                    "rejection note",
                ),
            )
            count += len(results)
            log.warning(
                "run %s: %d result(s) delivered to %s withdrawn by rejection note %s",
                run_id,
                len(results),
                destination,
                kos.SOPInstanceUID,
            )
        return count

    def _source_header(self, run_id: str) -> Dataset:
        """The header of the run's first instance: the patient and study of its results."""
        for inst in self.db.run_instances(run_id):
            try:
                return dcmread(inst.path, stop_before_pixels=True)
            except (OSError, ValueError):
                continue
        raise FileNotFoundError(
            f"no instance of run {run_id} can be read (deleted by retention?): the node no "
            "longer has the patient and study its note must carry"
        )


def _some(run_ids: list[str], shown: int = 10) -> str:
    """The first run IDs, and how many more (a run's reason stays readable)."""
    more = len(run_ids) - shown
    return ", ".join(run_ids[:shown]) + (f" and {more} more" if more > 0 else "")
