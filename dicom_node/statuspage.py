"""The status page at ``/`` on the REST port: plain server-rendered HTML, no script,
no build step, so that it works in any browser on a ward PC.

Runs of the last hours with their jobs, stages, timings and the quality verdict
of each result; the results whose verdict is not ok, with why and their measures;
failed jobs with their reason and a retry button (shown to callers with the
``operate`` scope, posting a form with a CSRF field); the outbox per destination;
the model packages configured. Every value comes from the index and is escaped; job
errors were scrubbed of data set values when they were recorded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from html import escape
from pathlib import Path

from dicom_node import __version__
from dicom_node.db import Database
from dicom_node.metrics import STAGES, package_identity
from dicom_node.settings import Settings

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;margin-bottom:.6em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee} .muted{color:#777} .uid{font-family:monospace;font-size:12px}
.s-done,.s-routed,.s-sent{color:#176e1b} .s-failed,.s-unroutable{color:#b00020;font-weight:600}
.s-running,.s-queued,.s-pending,.s-receiving,.s-complete{color:#8a5a00}
.v-ok{color:#176e1b} .v-low_confidence{color:#8a5a00;font-weight:600} .v-failed{color:#b00020;font-weight:600}
.chip{display:inline-block;padding:0 .5em;margin-right:.4em;border-radius:.8em;background:#e8e8e8}
form{margin:0} button{cursor:pointer}
"""


def _t(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _age(ts: float | None, now: float) -> str:
    if not ts:
        return ""
    s = max(0, int(now - ts))
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def _verdict(verdict: str | None) -> str:
    """A result's quality verdict (issue 13), coloured like the states."""
    verdict = verdict or ""
    label = verdict.replace("_", " ")
    return f'<span class="v-{escape(verdict)}">{escape(label)}</span>'


def _state(state: str | None) -> str:
    state = state or ""
    return f'<span class="s-{escape(state)}">{escape(state)}</span>'


def _timings(timings: Mapping[str, float]) -> str:
    parts = [f"{STAGES[k]} {timings[k]:.2f} s" for k in STAGES if k in timings]
    return ", ".join(parts)


def _retry(job_id: int, csrf: str | None) -> str:
    if csrf is None:
        return ""
    return (
        f'<form method="post" action="/jobs/{job_id}/retry">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}">'
        f'<button type="submit" id="retry-{job_id}">Retry</button></form>'
    )


def render(
    db: Database,
    settings: Settings,
    who: str,
    csrf: str | None,
    hours: float = 24.0,
    message: str = "",
    dicom_port: int | None = None,
    jobs_memory: dict[str, int] | None = None,
) -> bytes:
    """The page; ``csrf`` None hides the retry buttons (no operate scope);
    ``jobs_memory``: the embedded engine's memory pool (``MemoryPool.snapshot``)."""
    now = time.time()
    summary = db.status_summary()
    snap = db.metrics_snapshot()
    runs = db.recent_runs(now - hours * 3600)
    out: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="30">',
        f"<title>{escape(settings.ae_title)}: angio-dicom-node</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(settings.ae_title)} <span class=muted>angio-dicom-node {__version__}</span></h1>",
        f"<p class=muted>DICOM port {dicom_port or settings.port}{' (TLS)' if settings.tls.dicom else ''}, "
        f"{_t(now)}, signed in as {escape(who)}. The page refreshes every 30 s.</p>",
    ]
    if message:
        out.append(f'<p id="message"><b>{escape(message)}</b></p>')
    out.append("<p>")
    out.append(f'<span class=chip id="instances">instances {summary["instances"]}</span>')
    for label, counts in (("runs", summary["runs"]), ("jobs", summary["jobs"])):
        for state, n in sorted(counts.items()):
            out.append(f'<span class="chip">{label} {_state(state)} {n}</span>')
    out.append(f'<span class=chip id="queue">queue {snap["queue_depth"]}</span>')
    out.append(
        f'<span class=chip id="older" title="queued jobs of runs acquired before '
        f'workers.live_window_h: they wait behind live runs">older runs queued '
        f"{summary['older_queued_jobs']}</span>"
    )
    for sender, n in summary["queued_jobs_by_sender"].items():
        out.append(
            f'<span class=chip title="queued jobs of this sender (calling AE): the senders '
            f'take turns">queued from {escape(sender)} {n}</span>'
        )
    out.append(f'<span class=chip id="purged">purged {summary["purged_runs"]}</span>')
    if jobs_memory is not None:
        out.append(
            f'<span class=chip id="memory" title="[workers] jobs_memory_mib: the budgets the '
            f'running jobs reserve; a job that does not fit waits before it decodes">jobs '
            f"memory {jobs_memory['reserved_bytes'] / 2**30:.3g} of "
            f"{jobs_memory['bytes'] / 2**30:.3g} GiB reserved, "
            f"{jobs_memory['waiting_jobs']} waiting</span>"
        )
    for verdict, n in summary["verdicts"].items():
        out.append(f'<span class="chip">results {_verdict(verdict)} {n}</span>')
    out.append("</p>")

    out.append("<h2>Results to check</h2>")
    doubtful = summary["doubtful_results"]
    if not doubtful:
        out.append("<p class=muted>none: every assessed result is ok</p>")
    else:
        out.append('<table id="doubtful"><tr><th>job</th><th>pipeline</th><th>run</th>')
        out.append("<th>verdict</th><th>why</th><th>measures</th></tr>")
        for d in doubtful:
            out.append(
                f"<tr><td>#{d['id']}</td><td>{escape(d['pipeline'])}</td>"
                f"<td class=uid>{escape(d['run_id'])}</td><td>{_verdict(d['verdict'])}</td>"
                f"<td>{escape(d['reasons'])}</td><td><small>{escape(d['measures'])}</small></td></tr>"
            )
        out.append("</table>")

    out.append("<h2>Failed jobs</h2>")
    failed = summary["failed_jobs"]
    if not failed:
        out.append("<p class=muted>none</p>")
    else:
        out.append('<table id="failed"><tr><th>job</th><th>pipeline</th><th>run</th>')
        out.append("<th>when</th><th>reason</th><th></th></tr>")
        for f in failed:
            out.append(
                f"<tr><td>{f['id']}</td><td>{escape(f['pipeline'])}</td>"
                f"<td class=uid>{escape(f['run_id'])}</td><td>{_t(f['updated_at'])}</td>"
                f"<td>{escape(f['error'] or '')}</td><td>{_retry(f['id'], csrf)}</td></tr>"
            )
        out.append("</table>")

    out.append(f"<h2>Runs of the last {hours:g} hours</h2>")
    if not runs:
        out.append("<p class=muted>none</p>")
    else:
        out.append('<table id="runs"><tr><th>run</th><th>from</th><th>instances</th>')
        out.append("<th>state</th><th>rule</th><th>last activity</th><th>jobs</th></tr>")
        for r in runs:
            jobs = "".join(
                f"<div>#{j['id']} {escape(j['pipeline'])} {_state(j['state'])}"
                f"{' ' + _verdict(j['verdict']) if j['verdict'] else ''}"
                f" <span class=muted>attempt {j['attempts']}"
                f"{'; ' + _timings(j['timings']) if j['timings'] else ''}</span>"
                f"{'<br><small>' + escape(j['error']) + '</small>' if j['error'] else ''}</div>"
                for j in r["jobs"]
            )
            reason = f"<br><small>{escape(r['reason'])}</small>" if r["reason"] else ""
            # the suite a forwarder (an Orthanc) sent it for
            named = f" for {escape(r['sender'])}" if r["sender"] != r["calling_aet"] else ""
            out.append(
                f"<tr><td class=uid>{escape(r['run_id'])}</td>"
                f"<td>{escape(r['calling_aet'])}{named}</td>"
                f"<td>{r['instances']}</td><td>{_state(r['state'])}{reason}</td>"
                f"<td>{escape(r['rule'] or '')}</td><td>{_t(r['last_at'])}</td><td>{jobs}</td></tr>"
            )
        out.append("</table>")

    out.append("<h2>Outbox</h2>")
    outbox = db.outbox_by_destination()
    configured = [d.name for d in settings.destinations]
    names = configured + [o["destination"] for o in outbox if o["destination"] not in configured]
    if not names:
        out.append("<p class=muted>no destination configured</p>")
    else:
        by_name = {o["destination"]: o for o in outbox}
        out.append('<table id="outbox"><tr><th>destination</th><th>pending</th><th>sent</th>')
        out.append(
            "<th>failed</th><th>storage commitment</th><th>oldest pending</th>"
            "<th>last sent</th><th>last error</th></tr>"
        )
        committing = {
            d.name for d in settings.destinations if getattr(d, "storage_commitment", False)
        }
        for name in names:
            o = by_name.get(name, {})
            commitment = (
                f"{o.get('committed') or 0} committed, {o.get('awaiting_commitment') or 0} awaited"
                if name in committing
                else "not asked"
            )
            out.append(
                f"<tr><td>{escape(name)}</td><td>{o.get('pending') or 0}</td>"
                f"<td>{o.get('sent') or 0}</td><td>{o.get('failed') or 0}</td>"
                f"<td>{commitment}</td>"
                f"<td>{_age(o.get('oldest_pending'), now)}</td><td>{_t(o.get('last_sent'))}</td>"
                f"<td>{escape(o.get('last_error') or '')}</td></tr>"
            )
        out.append("</table>")

    commitments = db.commitments_by_sender()
    if commitments or settings.storage_commitment.report_to:
        out.append("<h2>Storage commitment</h2>")
        out.append('<table id="commitments"><tr><th>requester</th><th>pending</th>')
        out.append(
            "<th>reported</th><th>given up</th><th>last reported</th><th>last error</th></tr>"
        )
        for c in commitments:
            out.append(
                f"<tr><td>{escape(c['calling_aet'])}</td><td>{c['pending']}</td>"
                f"<td>{c['reported']}</td><td>{c['given_up']}</td><td>{_t(c['last_reported'])}</td>"
                f"<td>{escape(c['last_error'] or '')}</td></tr>"
            )
        out.append("</table>")

    out.append("<h2>Model packages</h2>")
    if not settings.models:
        out.append("<p class=muted>none configured: every pipeline runs its classical path</p>")
    else:
        out.append('<table id="packages"><tr><th>pipeline</th><th>package</th><th>version</th>')
        out.append("<th>folder</th></tr>")
        for pipeline, folder in sorted(settings.models.items()):
            name, version = package_identity(Path(folder))
            out.append(
                f"<tr><td>{escape(pipeline)}</td><td>{escape(name)}</td>"
                f"<td>{escape(version)}</td><td class=uid>{escape(str(folder))}</td></tr>"
            )
        out.append("</table>")
    out.append(
        '<p class=muted>JSON: <a href="/status">/status</a>, <a href="/metrics">/metrics</a></p>'
    )
    out.append("</body></html>")
    return "".join(out).encode()
