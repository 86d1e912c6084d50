"""Where archived studies come from: a DICOMweb server, the node's own spool, a folder.

Every source does two things: ``scan()`` lists its instances with their
headers (no pixel data), cheaply, so that annotations can be matched to runs
before anything large moves; ``fetch(instance)`` returns a local file with the
whole instance, downloading it first for DICOMweb (into a cache keyed by SOP
Instance UID, so a rebuild downloads nothing twice).

DICOMweb uses plain ``requests``: QIDO-RS ``/series?Modality=..`` finds the
series (angiography runs, volumes, the SEG annotations and the Secondary
Capture canvases they may reference), WADO-RS ``/metadata`` gives the headers
of a whole series in one call, and WADO-RS retrieves single instances as
``multipart/related; type="application/dicom"``.

Errors::

    SourceError        a source that cannot be read (unreachable server,
                       HTTP error, missing folder or node database)
"""

from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import requests
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.sopclasses import CINE_2D, VOLUME
from training.annotations import RunInfo, is_canvas_header, is_run_header

log = logging.getLogger(__name__)

# Modalities whose series are scanned on a DICOMweb server by default:
# runs (XA, XRF, CT for rotational volumes), annotations (SEG), canvases (OT).
DEFAULT_MODALITIES = ("XA", "XRF", "CT", "SEG", "OT")
_FIELDS = ("00080016", "00080018", "0020000D", "0020000E", "00100020", "00080060")


class SourceError(Exception):
    """A source that cannot be read, with the reason."""


@dataclass
class Instance:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    header: Dataset
    locator: str  # a path, or "study/series/instance" on a DICOMweb server


def instance_from_header(header: Dataset, locator: str) -> Instance:
    return Instance(
        sop_instance_uid=str(header.SOPInstanceUID),
        sop_class_uid=str(header.SOPClassUID),
        series_uid=str(header.get("SeriesInstanceUID", "")),
        study_uid=str(header.get("StudyInstanceUID", "")),
        patient_id=str(header.get("PatientID", "") or ""),
        header=header,
        locator=locator,
    )


class Source(Protocol):
    description: str

    def scan(self) -> list[Instance]: ...

    def fetch(self, instance: Instance) -> Path: ...


def _read_header(path: Path) -> Dataset | None:
    try:
        ds = dcmread(path, stop_before_pixels=True)
        ds.SOPInstanceUID  # noqa: B018  (a file without it is not an instance)
        ds.SOPClassUID  # noqa: B018
    except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
        log.debug("skipping %s: not a DICOM instance (%s)", path, exc.__class__.__name__)
        return None
    return ds


class FolderSource:
    """Every DICOM file under a folder (recursively); other files are skipped."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"folder {self.root} does not exist")
        self.description = f"folder {self.root}"

    def scan(self) -> list[Instance]:
        out = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            header = _read_header(path)
            if header is not None:
                out.append(instance_from_header(header, str(path)))
        return out

    def fetch(self, instance: Instance) -> Path:
        return Path(instance.locator)


class SpoolSource:
    """The node's own archive: instances indexed in ``storage_dir/node.sqlite``,
    files under ``storage_dir/spool``. The database is opened read-only."""

    def __init__(self, storage_dir: str | Path) -> None:
        self.storage_dir = Path(storage_dir)
        self.db_path = self.storage_dir / "node.sqlite"
        if not self.db_path.is_file():
            raise SourceError(f"no node database at {self.db_path}")
        self.description = f"node spool {self.storage_dir}"

    def scan(self) -> list[Instance]:
        try:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
            try:
                rows = con.execute("SELECT path FROM instances ORDER BY received_at").fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise SourceError(f"cannot read {self.db_path}: {exc}") from None
        out = []
        for (path,) in rows:
            p = Path(path)
            if not p.is_absolute() and not p.exists():
                p = self.storage_dir / p
            if not p.is_file():
                log.warning("indexed instance %s is missing from the spool", p)
                continue
            header = _read_header(p)
            if header is not None:
                out.append(instance_from_header(header, str(p)))
        return out

    def fetch(self, instance: Instance) -> Path:
        return Path(instance.locator)

    def rejected_runs(self, pipeline: str | None = None) -> list[dict[str, object]]:
        """The runs whose results a destination rejected (IHE IOCM rejection notes the
        node kept as feedback: ``dicom-node status``), newest first: the cases a model
        got wrong by a reader's verdict, to annotate first. Each with its study and
        series (to fetch from the PACS once the node has purged it), pipeline, job,
        the notes' titles and how many results were rejected."""
        sql = (
            "SELECT r.run_id, r.study_uid, r.series_uid, j.pipeline, j.id AS job_id, "
            "GROUP_CONCAT(DISTINCT x.code || ' ' || x.meaning) AS reasons, "
            "COUNT(DISTINCT x.sop_instance_uid) AS results, MAX(x.at) AS at, "
            "r.purged_at IS NOT NULL AS purged "
            "FROM result_rejections x JOIN jobs j ON j.id = x.job_id "
            "JOIN runs r ON r.run_id = j.run_id "
            + ("WHERE j.pipeline = ? " if pipeline else "")
            + "GROUP BY j.id ORDER BY at DESC"
        )
        try:
            con = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
            con.row_factory = sqlite3.Row
            try:
                rows = con.execute(sql, (pipeline,) if pipeline else ()).fetchall()
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise SourceError(f"cannot read {self.db_path}: {exc}") from None
        return [dict(r) for r in rows]


def _skip_bulk(*_args: object) -> bytes:
    return b""


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a multipart/related body (headers stripped)."""
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise SourceError(f"multipart response without a boundary ({content_type})")
    delimiter = b"--" + boundary.encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        parts.append(content)
    return parts


class DicomwebSource:
    """A DICOMweb server (Orthanc's plugin, dcm4chee, a cloud archive)."""

    def __init__(
        self,
        url: str,
        cache_dir: str | Path,
        *,
        modalities: Sequence[str] = DEFAULT_MODALITIES,
        username: str | None = None,
        password: str | None = None,
        bearer_token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.modalities = tuple(modalities)
        self.timeout = timeout
        self.session = requests.Session()
        if username is not None:
            self.session.auth = (username, password or "")
        if bearer_token:
            self.session.headers["Authorization"] = f"Bearer {bearer_token}"
        self.description = f"DICOMweb {self.url}"  # never the credentials

    def _get(
        self, path: str, accept: str, params: dict[str, str] | None = None
    ) -> requests.Response:
        try:
            resp = self.session.get(
                f"{self.url}{path}", headers={"Accept": accept}, params=params, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise SourceError(f"{self.description} unreachable: {exc}") from None
        if resp.status_code == 204:
            return resp
        if not resp.ok:
            raise SourceError(
                f"{self.description}{path}: HTTP {resp.status_code} {resp.text[:200]}"
            )
        return resp

    def search_series(self, modality: str) -> list[tuple[str, str]]:
        """(study, series) UIDs of every series of ``modality`` (QIDO-RS, paged)."""
        found: list[tuple[str, str]] = []
        offset, limit = 0, 500
        while True:
            resp = self._get(
                "/series",
                "application/dicom+json",
                {
                    "Modality": modality,
                    "limit": str(limit),
                    "offset": str(offset),
                    "includefield": "0020000D",
                },
            )
            items = resp.json() if resp.status_code != 204 and resp.content else []
            for item in items:
                study = item.get("0020000D", {}).get("Value", [None])[0]
                series = item.get("0020000E", {}).get("Value", [None])[0]
                if study and series:
                    found.append((str(study), str(series)))
            if len(items) < limit:
                return found
            offset += limit

    def series_metadata(self, study: str, series: str) -> list[Dataset]:
        resp = self._get(f"/studies/{study}/series/{series}/metadata", "application/dicom+json")
        if resp.status_code == 204 or not resp.content:
            return []
        return [Dataset.from_json(item, bulk_data_uri_handler=_skip_bulk) for item in resp.json()]

    def scan(self) -> list[Instance]:
        seen: set[str] = set()
        out: list[Instance] = []
        series = list(dict.fromkeys(s for m in self.modalities for s in self.search_series(m)))
        for study, series_uid in series:
            for header in self.series_metadata(study, series_uid):
                uid = str(header.get("SOPInstanceUID", ""))
                if not uid or uid in seen or "SOPClassUID" not in header:
                    continue
                seen.add(uid)
                out.append(instance_from_header(header, f"{study}/{series_uid}/{uid}"))
        return out

    def fetch(self, instance: Instance) -> Path:
        path = self.cache_dir / f"{instance.sop_instance_uid}.dcm"
        if path.is_file():
            return path
        study, series, uid = instance.locator.split("/")
        resp = self._get(
            f"/studies/{study}/series/{series}/instances/{uid}",
            'multipart/related; type="application/dicom"; transfer-syntax=*',
        )
        parts = split_multipart(resp.content, resp.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise SourceError(f"WADO-RS returned {len(parts)} parts for instance {uid}")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(parts[0])
        tmp.replace(path)
        return path


# ---------------------------------------------------------------------------
# Grouping instances into runs, as the node does


def run_key(instance: Instance) -> str:
    """One multi-frame 2D instance is a run; otherwise the series is (as the spool keys runs)."""
    frames = int(instance.header.get("NumberOfFrames", 1) or 1)
    if instance.sop_class_uid in CINE_2D and frames > 1:
        return instance.sop_instance_uid
    return instance.series_uid


def _slice_position(ds: Dataset) -> float:
    ipp = np.asarray([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])])
    iop = np.asarray([float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    return float(ipp @ np.cross(iop[:3], iop[3:]))


@dataclass
class Inventory:
    """A scan sorted into runs, canvases and SEG instances."""

    runs: dict[str, list[Instance]]
    canvases: list[Instance]
    segs: list[Instance]
    other: list[Instance]

    def run_infos(self) -> list[RunInfo]:
        out = []
        for key, items in self.runs.items():
            first = items[0].header
            volume = items[0].sop_class_uid in VOLUME
            if volume and len(items) > 1:
                items = sorted(items, key=lambda i: _slice_position(i.header))
            elif len(items) > 1:
                items = sorted(items, key=lambda i: int(i.header.get("InstanceNumber", 0) or 0))
            self.runs[key] = items
            frames = len(items) if len(items) > 1 else int(first.get("NumberOfFrames", 1) or 1)
            out.append(
                RunInfo(
                    key=key,
                    headers=[i.header for i in items],
                    frames=frames,
                    rows=int(first.get("Rows", 0) or 0),
                    columns=int(first.get("Columns", 0) or 0),
                    is_volume=volume,
                )
            )
        return out


def inventory(instances: Iterable[Instance]) -> Inventory:
    runs: dict[str, list[Instance]] = defaultdict(list)
    canvases, segs, other = [], [], []
    for inst in instances:
        if is_run_header(inst.header):
            runs[run_key(inst)].append(inst)
        elif inst.sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.4":
            segs.append(inst)
        elif is_canvas_header(inst.header):
            canvases.append(inst)
        else:
            other.append(inst)
    return Inventory(dict(runs), canvases, segs, other)


def open_source(
    *,
    dicomweb: str | None = None,
    spool: str | None = None,
    folder: str | None = None,
    cache_dir: str | Path = ".dicomweb-cache",
    username: str | None = None,
    password: str | None = None,
    bearer_token: str | None = None,
) -> Source:
    """The one source the options name (exactly one must be given)."""
    given = [n for n, v in (("dicomweb", dicomweb), ("spool", spool), ("folder", folder)) if v]
    if len(given) != 1:
        raise SourceError(
            f"give exactly one source (--dicomweb, --spool or --folder), got {given or 'none'}"
        )
    if dicomweb:
        return DicomwebSource(
            dicomweb, cache_dir, username=username, password=password, bearer_token=bearer_token
        )
    if spool:
        return SpoolSource(spool)
    assert folder is not None
    return FolderSource(folder)
