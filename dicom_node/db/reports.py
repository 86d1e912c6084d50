"""Read-only reports: status, metrics, recent runs, jobs, earlier results."""

from __future__ import annotations

import json
from typing import Any

from dicom_node.db.core import Core
from dicom_node.db.records import (
    SENDER,
    CommitmentState,
    DeliveryState,
    JobState,
    RunState,
    now,
)

# How a job's notes record its result's quality (``pipelines.quality.Quality.notes``).
VERDICT_NOTE, QUALITY_NOTE = "verdict: ", "quality: "
VERDICTS = ("ok", "low_confidence", "failed")


def quality_of(notes: list[str]) -> dict[str, Any]:
    """The verdict (None when the result has no assessment), its reasons and the
    measures line, from a job's notes."""
    verdict, reasons, measures = None, "", ""
    for line in notes:
        if line.startswith(VERDICT_NOTE) and verdict is None:
            word, _, reasons = line[len(VERDICT_NOTE) :].partition(": ")
            verdict = word if word in VERDICTS else None
        elif line.startswith(QUALITY_NOTE) and not measures:
            measures = line[len(QUALITY_NOTE) :]
    return {"verdict": verdict, "reasons": reasons, "measures": measures}


class Reports(Core):
    """Reports for operators (read only)."""

    def status_summary(self) -> dict[str, Any]:
        def counts(table: str) -> dict[str, int]:
            return {
                r["state"]: r["n"]
                for r in self.query(f"SELECT state, COUNT(*) n FROM {table} GROUP BY state")
            }

        failures = [
            dict(r)
            for r in self.query(
                "SELECT id, run_id, pipeline, error, updated_at FROM jobs WHERE state=? "
                "ORDER BY id DESC LIMIT 20",
                (JobState.FAILED,),
            )
        ]
        backlog = [
            dict(r)
            for r in self.query(
                "SELECT destination, COUNT(*) n, MAX(attempts) attempts, MAX(error) error "
                "FROM outbox WHERE state=? GROUP BY destination",
                (DeliveryState.PENDING,),
            )
        ]
        unrouted = [
            dict(r)
            for r in self.query(
                "SELECT run_id, series_uid, state, reason FROM runs WHERE state IN (?,?) "
                "ORDER BY last_at DESC LIMIT 20",
                (RunState.UNROUTED, RunState.UNROUTABLE),
            )
        ]
        # Verdicts of done jobs (their notes' "verdict: ..." line), and the 20 newest
        # results that are not ok, with the reasons.
        like = tuple(f'%"{VERDICT_NOTE}{v}%' for v in VERDICTS)
        row = self.query(
            "SELECT "
            + ", ".join(f"SUM(notes LIKE ?) AS {v}" for v in VERDICTS)
            + " FROM jobs WHERE state=?",
            (*like, JobState.DONE),
        )[0]
        doubtful = [
            {k: r[k] for k in ("id", "run_id", "pipeline", "updated_at")}
            | quality_of(json.loads(r["notes"]))
            for r in self.query(
                "SELECT id, run_id, pipeline, notes, updated_at FROM jobs WHERE state=? AND"
                " (notes LIKE ? OR notes LIKE ?) ORDER BY id DESC LIMIT 20",
                (JobState.DONE, *like[1:]),
            )
        ]
        # storage commitment results not taken (yet, or given up), with why
        untaken = [
            dict(r)
            for r in self.query(
                "SELECT transaction_uid, calling_aet, state, attempts, error FROM commitments "
                "WHERE state!=? AND error IS NOT NULL ORDER BY requested_at DESC LIMIT 20",
                (CommitmentState.REPORTED,),
            )
        ]
        return {
            "instances": self.query("SELECT COUNT(*) n FROM instances")[0]["n"],
            "runs": counts("runs"),
            # runs whose files and results retention deleted (their rows are kept)
            "purged_runs": self.purged_runs(),
            "jobs": counts("jobs"),
            "older_queued_jobs": self.older_queued_jobs(),
            "queued_jobs_by_sender": self.queued_jobs_by_sender(),
            "outbox": counts("outbox"),
            "storage_commitments": counts("commitments"),
            # the node's results destinations rejected (IOCM), by pipeline and reason
            "rejected_results": self.rejected_results(),
            # the results sent to destinations that commit, by their commitment
            "result_commitments": {
                r["commitment"]: r["n"]
                for r in self.query(
                    "SELECT commitment, COUNT(*) n FROM outbox WHERE commitment IS NOT NULL "
                    "GROUP BY commitment"
                )
            },
            "untaken_commitments": untaken,
            "failed_jobs": failures,
            "outbox_backlog": backlog,
            "unrouted_runs": unrouted,
            "verdicts": {v: int(row[v] or 0) for v in VERDICTS},
            "doubtful_results": doubtful,
        }

    def rejected_results(self) -> list[dict[str, Any]]:
        """The node's results its destinations rejected (``result_rejections``), by
        pipeline and the rejection note's title."""
        return [
            dict(r)
            for r in self.query(
                "SELECT pipeline, code, meaning, COUNT(*) n, COUNT(DISTINCT job_id) jobs "
                "FROM result_rejections GROUP BY pipeline, code, meaning ORDER BY pipeline, code"
            )
        ]

    def older_queued_jobs(self) -> int:
        """Queued jobs of older runs (acquired before workers.live_window_h): they wait
        while a live run's job is due."""
        return int(
            self.query(
                "SELECT COUNT(*) n FROM jobs WHERE state=? AND priority > 0", (JobState.QUEUED,)
            )[0]["n"]
        )

    def queued_jobs_by_sender(self, limit: int = 20) -> dict[str, int]:
        """Queued jobs by their run's sender (calling AE or STOW-RS source, or whom a
        forwarder named), most
        first: the senders take turns (``jobs._TURN_ORDER``)."""
        rows = self.query(
            f"SELECT {SENDER.format('r')} AS sender, COUNT(*) n FROM jobs j "
            "JOIN runs r ON r.run_id = j.run_id WHERE j.state=? "
            "GROUP BY sender ORDER BY n DESC, sender LIMIT ?",
            (JobState.QUEUED, limit),
        )
        return {r["sender"]: int(r["n"]) for r in rows}

    def purged_runs(self) -> int:
        """Runs whose files and results retention deleted (their rows are kept)."""
        return int(self.query("SELECT COUNT(*) n FROM runs WHERE purged_at IS NOT NULL")[0]["n"])

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counts for the Prometheus gauges: runs by state, jobs by pipeline and state,
        jobs due now, deliveries by destination and state, storage commitments both ways."""
        t = now()
        return {
            "runs": {
                r["state"]: r["n"]
                for r in self.query("SELECT state, COUNT(*) n FROM runs GROUP BY state")
            },
            "jobs": [
                (r["pipeline"], r["state"], r["n"])
                for r in self.query(
                    "SELECT pipeline, state, COUNT(*) n FROM jobs GROUP BY pipeline, state"
                )
            ],
            "purged_runs": self.purged_runs(),
            "older_queued_jobs": self.older_queued_jobs(),
            "queue_depth": self.query(
                "SELECT COUNT(*) n FROM jobs WHERE state=? AND not_before <= ?",
                (JobState.QUEUED, t),
            )[0]["n"],
            "outbox": [
                (r["destination"], r["state"], r["n"])
                for r in self.query(
                    "SELECT destination, state, COUNT(*) n FROM outbox GROUP BY destination, state"
                )
            ],
            # results sent to destinations that commit, by their commitment
            "result_commitments": [
                (r["destination"], r["commitment"], r["n"])
                for r in self.query(
                    "SELECT destination, commitment, COUNT(*) n FROM outbox "
                    "WHERE commitment IS NOT NULL GROUP BY destination, commitment"
                )
            ],
            "rejected_results": self.rejected_results(),
            # storage commitment requests of senders, by requester and state
            "storage_commitments": [
                (r["calling_aet"], r["state"], r["n"])
                for r in self.query(
                    "SELECT calling_aet, state, COUNT(*) n FROM commitments "
                    "GROUP BY calling_aet, state"
                )
            ],
        }

    def recent_runs(self, since: float, limit: int = 200) -> list[dict[str, Any]]:
        """Runs with activity since ``since``, newest first, each with its jobs."""
        runs = [
            dict(r)
            for r in self.query(
                "SELECT run_id, series_uid, study_uid, calling_aet, state, first_at, last_at,"
                f" {SENDER.format('r')} AS sender,"
                " rule, reason, (SELECT COUNT(*) FROM instances i WHERE i.run_id=r.run_id)"
                " AS instances FROM runs r WHERE last_at >= ? OR run_id IN"
                " (SELECT run_id FROM jobs WHERE updated_at >= ?) ORDER BY last_at DESC LIMIT ?",
                (since, since, limit),
            )
        ]
        by_run: dict[str, list[dict[str, Any]]] = {r["run_id"]: [] for r in runs}
        if runs:
            marks = ",".join("?" * len(runs))
            for j in self.query(
                "SELECT id, run_id, pipeline, state, attempts, error, timings, notes,"
                f" created_at, updated_at FROM jobs WHERE run_id IN ({marks}) ORDER BY id",
                tuple(by_run),
            ):
                job = dict(j)
                job["timings"] = json.loads(job["timings"]) if job["timings"] else {}
                job |= quality_of(json.loads(job.pop("notes") or "[]"))
                by_run[job["run_id"]].append(job)
        for r in runs:
            r["jobs"] = by_run[r["run_id"]]
        return runs

    def outbox_by_destination(self) -> list[dict[str, Any]]:
        """Per destination: deliveries by state (and by storage commitment), the oldest
        pending and the last error."""
        rows = self.query(
            "SELECT destination, SUM(state='pending') pending, SUM(state='sent') sent,"
            " SUM(state='failed') failed, SUM(commitment='awaiting') awaiting_commitment,"
            " SUM(commitment='committed') committed,"
            " MIN(CASE WHEN state='pending' THEN created_at END)"
            " oldest_pending, MAX(sent_at) last_sent,"
            " (SELECT error FROM outbox o2 WHERE o2.destination=o.destination AND"
            " o2.error IS NOT NULL ORDER BY o2.id DESC LIMIT 1) last_error"
            " FROM outbox o GROUP BY destination ORDER BY destination"
        )
        return [dict(r) for r in rows]

    def commitments_by_sender(self) -> list[dict[str, Any]]:
        """Per requester: storage commitment results by state, the last reported, the
        last error."""
        rows = self.query(
            "SELECT calling_aet, SUM(state='pending') pending, SUM(state='reported') reported,"
            " SUM(state='given_up') given_up, MAX(reported_at) last_reported,"
            " (SELECT error FROM commitments c2 WHERE c2.calling_aet=c.calling_aet AND"
            " c2.error IS NOT NULL ORDER BY c2.requested_at DESC LIMIT 1) last_error"
            " FROM commitments c GROUP BY calling_aet ORDER BY calling_aet"
        )
        return [dict(r) for r in rows]

    def jobs_for(
        self,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> list[dict[str, Any]]:
        where, params = "", ()  # type: tuple[str, tuple[str, ...]]
        if sop_instance_uid:
            where, params = (
                "WHERE r.run_id IN (SELECT run_id FROM instances WHERE sop_instance_uid=?)",
                (sop_instance_uid,),
            )
        elif series_uid:
            where, params = "WHERE r.series_uid=?", (series_uid,)
        elif study_uid:
            where, params = "WHERE r.study_uid=?", (study_uid,)
        rows = self.query(
            "SELECT j.id, j.run_id, j.pipeline, j.state, j.attempts, j.error, j.notes,"
            " j.created_at, j.updated_at, r.series_uid, r.study_uid, r.state AS run_state,"
            " r.rule, r.reason AS run_reason,"
            " (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state='sent') AS sent,"
            " (SELECT COUNT(*) FROM outbox o WHERE o.job_id=j.id AND o.state='pending') AS pending"
            f" FROM runs r LEFT JOIN jobs j ON j.run_id=r.run_id {where} ORDER BY r.first_at, j.id",
            params,
        )
        out = []
        for r in rows:
            d = dict(r)
            d["notes"] = json.loads(d["notes"]) if d.get("notes") else []
            d.update(quality_of(d["notes"]))
            out.append(d)
        return out

    def prior_result_paths(self, run_id: str, pipeline: str, before_job: int) -> list[str]:
        """Result files that earlier jobs of ``pipeline`` on this run queued for delivery,
        newest job first: a new result whose content changed names what it supersedes."""
        rows = self.query(
            "SELECT o.path, MAX(o.job_id) AS job FROM outbox o JOIN jobs j ON j.id = o.job_id"
            " WHERE j.run_id=? AND j.pipeline=? AND j.id<? GROUP BY o.path ORDER BY job DESC",
            (run_id, pipeline, before_job),
        )
        return [str(r["path"]) for r in rows]
