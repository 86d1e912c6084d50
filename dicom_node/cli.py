"""``dicom-node``: serve, process offline, explain routing, status, trigger, purge,
cancel; plus the commands other packages register (``synth``, ``demo``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node import __version__
from dicom_node.errors import NodeError, RejectedInstance
from pipelines.base import PipelineError

if TYPE_CHECKING:
    from dicom_node.settings import Settings

# More subcommands come from other packages of this distribution (the phantoms'
# `synth`, the end-to-end `demo` in `training`), through entry points, so that
# the service never imports them.
COMMANDS_GROUP = "dicom_node.commands"


def _files(paths: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise NodeError(f"{p} does not exist")
    return out


def group_runs(paths: Sequence[str], settings: Settings) -> tuple[dict[str, list[Path]], list[str]]:
    """Group DICOM files into runs exactly as the spool does, after the checks it makes
    before it acknowledges an instance (``spool.inspect``: a file it would refuse is
    skipped with its reason and status; one without a Series Instance UID ended the
    command with a traceback); returns runs and skipped files."""
    from dicom_node.spool import inspect

    runs: dict[str, list[Path]] = defaultdict(list)
    skipped: list[str] = []
    for f in _files(paths):
        try:
            head = inspect(f, settings.limits, max_uid_length=settings.max_uid_length)
        except RejectedInstance as exc:
            skipped.append(f"{f}: {exc.reason} (the node answers 0x{exc.status:04X})")
            continue
        except OSError as exc:
            skipped.append(f"{f}: cannot be read ({exc.strerror or exc.__class__.__name__})")
            continue
        runs[head.run_id].append(f)
    return dict(runs), skipped


def _head(files: Sequence[Path]) -> tuple[Dataset, int, int]:
    """The header the router reads for a run, its first instance of the run's SOP Class,
    how many instances of that class it has, and their frames (``dicom_node.router``)."""
    from dicom_node.sopclasses import run_sop_class

    heads = [
        dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "NumberOfFrames"])
        for f in files
    ]
    classes = [str(h.SOPClassUID) for h in heads]
    sop = run_sop_class(classes)
    frames = sum(
        int(h.get("NumberOfFrames", 1) or 1)
        for h, c in zip(heads, classes, strict=True)
        if c == sop
    )
    first = dcmread(files[classes.index(sop)], stop_before_pixels=True)
    return first, classes.count(sop), frames


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    node = Node(settings).start()
    print(
        f"dicom-node {__version__}: AE {settings.ae_title} on {settings.host}:{node.port}"
        + (f", REST API on http://{settings.api.host}:{node.api_port}" if node.api else ""),
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    node.stop()
    return 0


def cmd_rebuild_index(args: argparse.Namespace) -> int:
    from dicom_node.service import rebuild_index
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    aside, indexed, quarantined = rebuild_index(settings)
    print(f"the old index and results/ set aside in {aside}")
    print(
        f"a new index of the spool: {indexed} file(s) indexed, {quarantined} quarantined; "
        "the node processes their runs again once started (results keep their UIDs)"
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from dicom_node.worker import load_worker_config, run_worker

    return run_worker(load_worker_config(args.config))


def _unusable(option: str, path: object, exc: OSError) -> NodeError:
    """A file or folder an option names that cannot be read or written: an error line
    naming the option, not a traceback."""
    return NodeError(f"{option} {path}: {exc.strerror or exc}")


def cmd_process(args: argparse.Namespace) -> int:
    from dicom_node.processing import run_pipeline, write_dataset
    from dicom_node.routing import RunFeatures, effective_rules, route
    from dicom_node.runs import load_run
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    out = Path(args.output)
    try:  # before any run is processed (a traceback after them, before)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unusable("--output", out, exc) from None
    runs, skipped = group_runs(args.paths, settings)
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    produced = 0
    written: set[str] = set()  # the MinIP canvas is shared by the pipelines of a run
    for run_id, files in runs.items():
        if args.pipeline:
            names = [args.pipeline]
        else:
            first, count, frames = _head(files)
            features = RunFeatures.from_first(first, count, frames=frames)
            decision = route(effective_rules(settings), features)
            names = decision.pipelines
            if not names:
                why = decision.excluded or "use `dicom-node route --explain`"
                print(f"run {run_id}: not routed ({why})", file=sys.stderr)
                continue
        try:
            loaded = load_run(files)
        except NodeError as exc:
            print(f"run {run_id}: {exc}", file=sys.stderr)
            continue
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - a decoder's Rust panic (pyo3 PanicException)
            print(f"run {run_id}: cannot be read: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        for name in names:
            try:
                datasets, notes = run_pipeline(
                    loaded,
                    name,
                    settings.models,
                    settings.device,
                    options=settings.workers.pipeline_options.get(name),
                )
            except (PipelineError, NodeError) as exc:
                print(f"run {run_id}: {name} failed: {exc}", file=sys.stderr)
                continue
            for ds in datasets:
                if ds.SOPInstanceUID in written:
                    continue
                written.add(ds.SOPInstanceUID)
                try:
                    path = write_dataset(ds, out)
                except OSError as exc:  # a full disk under --output
                    raise _unusable("--output", out, exc) from None
                produced += 1
                print(f"{name}\t{ds.SOPClassUID.name}\t{ds.get('SeriesDescription', '')}\t{path}")
            for note in notes:
                print(f"run {run_id}: {name}: {note}", file=sys.stderr)
    if produced == 0:
        print("error: nothing could be processed", file=sys.stderr)
        return 2
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from dicom_node.routing import RunFeatures, effective_rules, route
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    if not args.paths:  # the settings alone: checked (load_settings), and the rules listed
        written = settings.rules is not None
        print(
            f"settings {args.config or '(defaults)'}: valid; "
            + ("its rules" if written else "no rules written: the built-in ones")
            + ", the first that matches a run wins:"
        )
        for n, rule in enumerate(effective_rules(settings), 1):
            conditions = rule.match.model_dump(exclude_defaults=True, mode="json")
            print(
                f"  {n}. {rule.name}: pipelines {rule.pipelines or 'none'}, destinations "
                f"{rule.destinations}; when {conditions or 'always'}"
            )
        return 0
    runs, skipped = group_runs(args.paths, settings)
    for s in skipped:
        print(f"skipped {s}")
    for run_id, files in runs.items():
        first, count, frames = _head(files)
        feats = RunFeatures.from_first(first, count, frames=frames)
        decision = route(effective_rules(settings), feats)
        print(
            f"run {run_id} ({count} instance(s), {feats.modality}, "
            f"{feats.number_of_frames} frame(s), {first.get('SeriesDescription', '')!s})"
        )
        if args.explain or decision.excluded:
            print(decision.explain())
        else:
            print(
                f"  -> {decision.rule.name if decision.rule else 'unrouted'}: {decision.pipelines}"
            )
    return 0 if runs else 2


def _api_call(settings: Any, args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    """A call to the running node's REST API: its address from the settings, the token
    from ``--token-file`` or $DICOM_NODE_API_TOKEN, the CA from ``--cacert``."""
    import requests

    scheme = "https" if settings.tls.api else "http"
    headers = {}
    token = os.environ.get("DICOM_NODE_API_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise _unusable("--token-file", args.token_file, exc) from None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{scheme}://{settings.api.host}:{settings.api.port}{path}"
    verify: str | bool = args.cacert or True
    try:
        return requests.request(method, url, headers=headers, verify=verify, **kw)
    except requests.RequestException as exc:  # it was a traceback
        raise NodeError(
            f"the node's API at {url} did not answer ({type(exc).__name__}): is the node "
            "running, on the [api] host and port of these settings?"
            + (
                " (--cacert: the CA of its certificate)"
                if isinstance(exc, requests.exceptions.SSLError)
                else ""
            )
        ) from None


def _jobs_memory(settings: Any, args: argparse.Namespace) -> tuple[dict[str, int] | None, str]:
    """The jobs' memory pool, which lives in the running node (not in the index): from
    its ``GET /status``; or None and why not."""

    if not settings.api.enabled:
        return None, "the node's API is disabled ([api] enabled = false)"
    try:
        resp = _api_call(settings, args, "GET", "/status", timeout=10)
    except NodeError as exc:
        return None, str(exc)
    if not resp.ok:
        return None, f"the node's API answered {resp.status_code}"
    memory = resp.json().get("jobs_memory")
    if memory is None:
        return None, "the node runs its jobs on Temporal workers (their /metrics show it)"
    return memory, ""


def cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.service import damage_explained, open_index
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    if not settings.db_path.exists():
        print(f"no node database at {settings.db_path}", file=sys.stderr)
        return 2
    with damage_explained(settings.db_path):
        summary = open_index(settings.db_path).status_summary()
    memory, why_not = _jobs_memory(settings, args)
    if args.json:  # the shape of GET /status: jobs_memory only where there is one
        if memory is None:
            print(f"jobs' memory pool not shown: {why_not}", file=sys.stderr)
        else:
            summary["jobs_memory"] = memory
        print(json.dumps(summary, indent=1, default=str))
        return 0
    print(f"instances: {summary['instances']}")
    print(f"purged runs (files deleted by retention): {summary['purged_runs']}")
    for key in ("runs", "jobs", "outbox", "result_commitments", "storage_commitments"):
        print(f"{key}: " + (", ".join(f"{k} {v}" for k, v in summary[key].items()) or "none"))  # type: ignore[attr-defined]
    for r in summary["rejected_results"]:  # type: ignore[attr-defined]
        print(
            f"results rejected at a destination ({r['code']} {r['meaning']}): {r['pipeline']} "
            f"{r['n']} of {r['jobs']} job(s)"
        )
    for c in summary["untaken_commitments"]:  # type: ignore[attr-defined]
        print(
            f"storage commitment {c['transaction_uid']} from {c['calling_aet']} {c['state']} "
            f"after {c['attempts']} attempt(s): {c['error']}"
        )
    print(f"queued jobs of older runs (behind live runs): {summary['older_queued_jobs']}")
    senders = summary["queued_jobs_by_sender"]
    print(
        "queued jobs by sender (taking turns): "
        + (", ".join(f"{k} {v}" for k, v in senders.items()) or "none")  # type: ignore[attr-defined]
    )
    if memory is None:
        print(f"jobs' memory pool: not shown: {why_not}")
    else:
        print(
            f"jobs' memory pool: {memory['reserved_bytes'] / 2**30:.3g} of "
            f"{memory['bytes'] / 2**30:.3g} GiB reserved by {memory['running_jobs']} running "
            f"job(s), {memory['waiting_jobs']} job(s) waiting for room"
        )
    for f in summary["failed_jobs"]:  # type: ignore[attr-defined]
        print(f"failed job {f['id']} {f['pipeline']} run {f['run_id']}: {f['error']}")
    verdicts = summary["verdicts"]
    print("results: " + ", ".join(f"{k} {v}" for k, v in verdicts.items()))  # type: ignore[attr-defined]
    for d in summary["doubtful_results"]:  # type: ignore[attr-defined]
        job = f"job {d['id']} {d['pipeline']} run {d['run_id']}"
        print(f"{d['verdict']} result of {job}: {d['reasons']}")
    for b in summary["outbox_backlog"]:  # type: ignore[attr-defined]
        print(f"backlog to {b['destination']}: {b['n']} object(s), last error: {b['error']}")
    for u in summary["unrouted_runs"]:  # type: ignore[attr-defined]
        print(f"{u['state']} run {u['run_id']}: {u['reason']}")
    return 0


def cmd_trigger(args: argparse.Namespace) -> int:
    return _operate(args, "/reprocess" if args.reprocess else "/trigger", timeout=30)


def cmd_purge(args: argparse.Namespace) -> int:
    """An operator's purge on a running node (its spool locks are the node's)."""
    return _operate(args, "/purge", timeout=120)


def cmd_cancel(args: argparse.Namespace) -> int:
    """An operator's cancel on a running node (its workers are the node's)."""
    return _operate(args, "/cancel", timeout=60)


def _operate(args: argparse.Namespace, path: str, timeout: float) -> int:
    """POST the runs ``--run``, ``--series`` or ``--study`` select to the running node's
    ``path``; prints its answer (``_add_operate_arguments``)."""
    from dicom_node.settings import load_settings

    given = (("run_id", args.run), ("series_uid", args.series), ("study_uid", args.study))
    selector = {k: v for k, v in given if v}
    resp = _api_call(load_settings(args.config), args, "POST", path, json=selector, timeout=timeout)
    print(resp.text)
    return 0 if resp.ok else 1


def _add_operate_arguments(p: argparse.ArgumentParser) -> None:
    """The runs an operator's command selects, and how it reaches the node's API."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="a run ID (a multi-frame instance's SOP Instance UID)")
    g.add_argument("--series")
    g.add_argument("--study")
    p.add_argument("--config")
    p.add_argument("--token-file", help="API token (default: $DICOM_NODE_API_TOKEN)")
    p.add_argument("--cacert", help="CA certificate of an HTTPS API")


def cmd_token(args: argparse.Namespace) -> int:
    """A new API token: printed once; the settings keep only its SHA-256."""
    from dicom_node.auth import SCOPES, hash_token, new_token

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        print(f"error: scopes are {', '.join(SCOPES)} (got {args.scopes})", file=sys.stderr)
        return 2
    from pydantic import ValidationError

    from dicom_node.settings import ApiToken

    token = new_token()
    digest = hash_token(token)
    try:  # the entry the settings would refuse at the node's start (an empty name, a space)
        ApiToken(name=args.name, sha256=digest, scopes=scopes)
    except ValidationError:
        pattern = ApiToken.model_fields["name"].metadata[0].pattern
        print(f"error: --name must match {pattern} (got {args.name!r})", file=sys.stderr)
        return 2
    if args.output:
        out = Path(args.output)
        try:
            out.touch(mode=0o600, exist_ok=False)
            out.write_text(token + "\n")
        except OSError as exc:  # a traceback, before (an existing file is not overwritten)
            raise _unusable("--output", out, exc) from None
        print(f"token written to {out} (mode 600)", file=sys.stderr)
    else:
        print(f"token (shown once; give it to the client): {token}", file=sys.stderr)
    print(
        f'[[api.tokens]]\nname = "{args.name}"\nsha256 = "{digest}"\nscopes = {json.dumps(scopes)}'
    )
    print(f"# or, in api.tokens_file: {args.name} {digest} {','.join(scopes)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the node (storage SCP, workers, outbox, REST API)")
    p.add_argument("--config", help="TOML settings file")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "rebuild-index",
        help="a new index from the spool, for a damaged one (the node stopped): the old "
        "index and results/ are set aside, the spool's runs are processed again",
    )
    p.add_argument("--config", help="TOML settings file")
    p.set_defaults(func=cmd_rebuild_index)

    p = sub.add_parser("worker", help="a scale-out worker: jobs from a Temporal task queue")
    p.add_argument("--config", required=True, help="TOML worker settings file")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("process", help="offline: process DICOM files or folders into result files")
    p.add_argument("paths", nargs="+")
    p.add_argument("--output", required=True)
    p.add_argument("--pipeline", help="force this pipeline instead of routing")
    p.add_argument("--config")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser(
        "route",
        help="show which rule matches each run; with no run, check the settings and list the rules",
    )
    p.add_argument("paths", nargs="*")
    p.add_argument("--explain", action="store_true", help="show every condition of every rule")
    p.add_argument("--config")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser(
        "status",
        help="runs, jobs, failures and outbox backlog (from the index); the jobs' memory "
        "pool (from the running node's API)",
    )
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--token-file", help="API token of the read scope (default: $DICOM_NODE_API_TOKEN)"
    )
    p.add_argument("--cacert", help="CA certificate of an HTTPS API")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "trigger", help="complete (or --reprocess) a run, series or study on a running node"
    )
    _add_operate_arguments(p)
    p.add_argument("--reprocess", action="store_true")
    p.set_defaults(func=cmd_trigger)

    p = sub.add_parser(
        "purge",
        help="processed runs on a running node lose their received files and results now",
    )
    _add_operate_arguments(p)
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser(
        "cancel",
        help="runs on a running node are not processed further: their queued and running "
        "jobs fail, their results not yet delivered are not sent",
    )
    _add_operate_arguments(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("token", help="make an API token and print its settings entry")
    p.add_argument("--name", required=True, help="who holds it (shown in the audit trail)")
    p.add_argument("--scopes", required=True, help="comma-separated: read,operate,store,worker")
    p.add_argument("--output", help="write the token to this new file (mode 600)")
    p.set_defaults(func=cmd_token)

    for entry in entry_points(group=COMMANDS_GROUP):
        try:
            add_command = entry.load()
        except ImportError as exc:
            p = sub.add_parser(entry.name, help=f"unavailable: {exc}")
            p.set_defaults(func=lambda _a, exc=exc, name=entry.name: _missing(name, exc))
        else:
            add_command(sub)
    return parser


def _missing(cmd: str, exc: Exception) -> int:
    print(f"error: `{cmd}` is unavailable: {exc}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    if args.command in ("serve", "worker"):
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:
        # apscheduler logs every run of a scheduled job at INFO: the completion sweep
        # alone would write two lines a second, 170,000 a day (-vv shows them)
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    from dicom_node import logsafe

    logsafe.install()
    try:
        return int(args.func(args) or 0)
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
