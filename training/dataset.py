"""Build a training dataset from a source: runs, their annotations, a patient-level
split, de-identification, and a versioned manifest whose hash names the data.

Layout of a dataset folder::

    manifest.json     what the dataset is (hashed): cases, splits, the SOP
                      instances each came from (pseudonymous UIDs), problems
    manifest.sha256   sha256 of manifest.json's bytes: the dataset's identity,
                      recorded in every model package trained on it
    build.json        how and when it was built (not hashed)
    cases/<id>.npz    decoded run pixels (as the node decodes them), frame
                      times, pixel spacing and one mask per annotated role
    dicom/<id>/       optional (--export-dicom): de-identified DICOM copies

The pseudonym map (salt, pseudonym -> Patient ID, new UID -> original UID)
goes to a separate path that must lie outside the dataset folder; whoever
holds it can trace every case back to its SOP instances, nobody else can.

De-identification (PS3.15 Annex E, a subset of the Basic Application Level
Confidentiality Profile with the Retain Longitudinal Temporal Information with
Modified Dates option): see :data:`REMOVE`, :data:`EMPTY`, :func:`deidentify`
and docs/training.md. Runs whose Burned In Annotation is YES are left out.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.errors import NodeError
from dicom_node.runs import load_run
from pipelines.base import Run, RunMeta
from training import versions
from training.annotations import Annotation, Problem, Resolver, merge, read_annotation
from training.sources import Inventory, Source, inventory

log = logging.getLogger(__name__)

FORMAT = 1
PROFILE = (
    "PS3.15 E.1 Basic Application Level Confidentiality Profile (subset) with "
    "Retain Longitudinal Temporal Information with Modified Dates Option"
)

# Removed (X) anywhere in the dataset.
REMOVE = (
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "PatientComments",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientBirthTime",
    "PatientInsurancePlanCodeSequence",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "StationName",
    "StudyDescription",
    "SeriesDescription",
    "RequestAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "ScheduledProcedureStepID",
    "RequestedProcedureID",
    "AdmittingDiagnosesDescription",
    "ImageComments",
    "ContentCreatorName",
    "ProtocolName",
    "IssuerOfPatientID",
    "ReferencedPatientSequence",
    "ReferencedStudySequence",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "CountryOfResidence",
    "RegionOfResidence",
    "CurrentPatientLocation",
    "PatientState",
    "ReasonForStudy",
)
# Kept present but emptied (Z: type 2 attributes).
EMPTY = ("ReferringPhysicianName", "StudyID", "PatientSex", "PatientBirthDate", "AccessionNumber")
# Replaced by a dummy (D: type 1 in some IODs, e.g. Enhanced General Equipment of SEG).
DUMMY = ("DeviceSerialNumber",)


class DatasetError(Exception):
    """A dataset that cannot be built or read, with the reason."""


# ---------------------------------------------------------------------------
# Pseudonyms and de-identification


@dataclass
class Pseudonyms:
    """Keyed pseudonyms; the salt never leaves the map file."""

    salt: str
    patients: dict[str, str] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load_or_create(cls, path: Path) -> Pseudonyms:
        if path.is_file():
            data = json.loads(path.read_text())
            return cls(
                salt=data["salt"], patients=data.get("patients", {}), uids=data.get("uids", {})
            )
        return cls(salt=secrets.token_hex(32))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(
            json.dumps(
                {"salt": self.salt, "patients": self.patients, "uids": self.uids},
                indent=1,
                sort_keys=True,
            )
        )
        tmp.chmod(0o600)
        tmp.replace(path)

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.salt.encode(), f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        pseudo = "P" + self._digest("patient", patient_id).hex()[:12].upper()
        self.patients[pseudo] = patient_id
        return pseudo

    def uid(self, uid: str) -> str:
        """A new 2.25 UID for ``uid``; standard DICOM UIDs (1.2.840.10008.*) are kept."""
        if uid.startswith("1.2.840.10008.") or not uid:
            return uid
        new = "2.25." + str(int.from_bytes(self._digest("uid", uid)[:16], "big"))
        self.uids[new] = uid
        return new

    def day_shift(self, patient_id: str) -> int:
        """A per-patient date shift (days, -3650..-365): intervals within a patient survive."""
        return -365 - int.from_bytes(self._digest("days", patient_id)[:4], "big") % 3286


def _shift_date(value: str, days: int) -> str:
    if len(value) < 8 or not value[:8].isdigit():
        return ""
    d = date(int(value[:4]), int(value[4:6]), int(value[6:8])) + timedelta(days=days)
    return d.strftime("%Y%m%d") + value[8:]


def deidentify(ds: Dataset, pseudonyms: Pseudonyms) -> Dataset:
    """A de-identified copy: identifiers removed or emptied, UIDs replaced,
    dates shifted per patient, private tags removed, the method recorded."""
    out = copy.deepcopy(ds)
    patient_id = str(ds.get("PatientID", "") or "")
    shift = pseudonyms.day_shift(patient_id)
    out.remove_private_tags()

    def visit(item: Dataset) -> None:
        for kw in REMOVE:
            if kw in item:
                del item[kw]
        for elem in list(item):
            if elem.VR == "SQ":
                for sub in elem.value:
                    visit(sub)
            elif elem.VR == "UI" and elem.value:
                if isinstance(elem.value, str):
                    elem.value = pseudonyms.uid(str(elem.value))
                else:
                    elem.value = [pseudonyms.uid(str(v)) for v in elem.value]
            elif elem.VR in ("DA", "DT") and elem.value:
                elem.value = _shift_date(str(elem.value), shift)

    visit(out)
    for kw in DUMMY:
        if kw in out:
            setattr(out, kw, "D" + pseudonyms.uid(str(out[kw].value))[-10:])
    for kw in EMPTY:
        if kw in out:
            setattr(out, kw, "")
    out.PatientID = pseudonyms.patient(patient_id)
    out.PatientName = out.PatientID
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.DeidentificationMethod = PROFILE[:64]
    method = Dataset()
    method.CodeValue, method.CodingSchemeDesignator, method.CodeMeaning = (
        "113100",
        "DCM",
        "Basic Application Confidentiality Profile",
    )
    option = Dataset()
    option.CodeValue, option.CodingSchemeDesignator, option.CodeMeaning = (
        "113107",
        "DCM",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    )
    out.DeidentificationMethodCodeSequence = [method, option]
    if hasattr(out, "file_meta") and "MediaStorageSOPInstanceUID" in out.file_meta:
        out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


# ---------------------------------------------------------------------------
# Patient-level split


def split_position(patient: str, seed: int) -> float:
    """Where a patient falls in [0, 1): a hash of (seed, pseudonym), nothing else."""
    return int(hashlib.sha256(f"{seed}:{patient}".encode()).hexdigest()[:15], 16) / 16**15


def patient_split(
    patients: Iterable[str],
    test_fraction: float,
    val_fraction: float,
    seed: int,
    carried: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Patient -> "train" | "val" | "test".

    A patient's split is a function of its own hash (:func:`split_position`): below
    ``test_fraction`` test, then val, then train; so adding patients never moves
    another one. ``carried`` (the previous version's assignments) wins over the rule.
    A small dataset whose rule leaves a split with a positive fraction empty gets a new
    patient moved there: train from 1 patient on (the one of the highest position),
    test from 2 and val from 3 (the lowest position). A patient is taken from train
    while train keeps one, else from another split that keeps one or is not needed;
    carried patients never move."""
    carried = dict(carried or {})
    unique = sorted(set(patients))
    position = {p: split_position(p, seed) for p in unique if p not in carried}
    out: dict[str, str] = {}
    for p in unique:
        if p in carried:
            out[p] = carried[p]
            continue
        u = position[p]
        out[p] = (
            "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        )
    n = len(unique)
    targets = (
        ("train", 1.0 - test_fraction - val_fraction, 1),
        ("test", test_fraction, 2),
        ("val", val_fraction, 3),
    )
    # (1e-9: 1 - 0.7 - 0.3 is 5.6e-17, not 0)
    required = {split for split, fraction, needed in targets if fraction > 1e-9 and n >= needed}
    for split in ("train", "test", "val"):
        if split not in required or split in out.values():
            continue
        sizes = Counter(out.values())
        donors = [p for p in position if sizes[out[p]] > 1 or out[p] not in required]
        if not donors:
            continue
        if split == "train":  # the patient closest to train: the highest position
            chosen = max(donors, key=position.__getitem__)
        else:  # from train first, the lowest position
            chosen = min(donors, key=lambda p: (out[p] != "train", position[p]))
        out[chosen] = split
    return out


# ---------------------------------------------------------------------------
# Manifest


def canonical_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so equal arrays give equal
    bytes and a rebuilt dataset keeps its hash."""
    tmp = path.with_suffix(".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, buf.getvalue())
    tmp.replace(path)


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> str:
    data = canonical_json(manifest)
    (root / "manifest.json").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / "manifest.sha256").write_text(f"{digest}  manifest.json\n")
    return digest


def manifest_hash(root: Path) -> str:
    return hashlib.sha256((Path(root) / "manifest.json").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Build


@dataclass
class BuildOptions:
    out: Path
    pseudonym_map: Path
    name: str = "dataset"
    version: str = "1"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    seed: int = 0
    include_unlabelled: bool = False
    deidentify: bool = True
    export_dicom: bool = False
    previous: Path | None = None  # the previous version's folder: splits carried, changes listed
    force: bool = False  # replace the version ``out`` holds even if its content changes

    def key(self) -> dict[str, Any]:
        out = {
            k: v
            for k, v in vars(self).items()
            if k not in ("out", "pseudonym_map", "previous", "force")
        }
        if self.previous is not None:  # (absent otherwise: older build keys stay valid)
            out["previous_sha256"] = manifest_hash(Path(self.previous))
        return out


_UID_RE = re.compile(r"\b\d+(?:\.\d+){3,}\b")


def _scrub(text: str, pseudonyms: Pseudonyms, deidentify: bool) -> str:
    """Replace every UID in a note or reason by its pseudonym."""
    return _UID_RE.sub(lambda m: pseudonyms.uid(m.group(0)), text) if deidentify else text


def _meta_dict(meta: RunMeta) -> dict[str, Any]:
    return {
        "modality": meta.modality,
        "sop_class_uid": meta.sop_class_uid,
        "rows": meta.rows,
        "columns": meta.columns,
        "number_of_frames": meta.number_of_frames,
        "pixel_spacing_mm": list(meta.pixel_spacing_mm) if meta.pixel_spacing_mm else None,
        "slice_spacing_mm": meta.slice_spacing_mm,
        "image_type": list(meta.image_type),
        "body_part": meta.body_part,
        "subtracted": meta.subtracted,
        "is_volume": meta.is_volume,
        "frame_rate": meta.frame_rate,
        "timed": meta.frame_times_s is not None,
    }


def _check_shape(annotation: Annotation, pixels: np.ndarray) -> str | None:
    shape = next(iter(annotation.masks.values())).shape
    expected = pixels.shape[1:] if annotation.geometry == "canvas" else pixels.shape
    if tuple(shape) != tuple(expected):
        return (
            f"annotation {annotation.geometry} shape {shape} does not fit run pixels {pixels.shape}"
        )
    return None


def build_dataset(
    source: Source, options: BuildOptions, progress: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Scan, match, decode, split, de-identify and write; returns the manifest.

    A dataset folder already built from the same instances with the same
    options is reused as it is (the manifest hash does not change).
    """
    out = Path(options.out).resolve()
    pmap = Path(options.pseudonym_map).resolve()
    if pmap == out or out in pmap.parents:
        raise DatasetError(f"the pseudonym map {pmap} must not lie inside the dataset {out}")
    previous = _previous(options, out)
    instances = source.scan()
    progress(f"{source.description}: {len(instances)} instances")
    inv = inventory(instances)
    build_key = hashlib.sha256(
        canonical_json(
            {
                "instances": sorted(i.sop_instance_uid for i in instances),
                "options": options.key(),
            }
        )
    ).hexdigest()
    cached = _reuse(out, build_key)
    if cached is not None:
        progress(f"dataset {out} is up to date (build key {build_key[:12]})")
        return cached
    pseudonyms = Pseudonyms.load_or_create(pmap)
    annotations, problems = _annotations(source, inv)
    # Written beside the target first: a build that would rewrite an existing version
    # is refused before anything of it is touched (training.versions).
    target, out = out, versions.staging(out)
    (out / "cases").mkdir(exist_ok=True)
    runs = {r.key: r for r in inv.run_infos()}
    patients = {
        key: str(items[0].patient_id or f"study:{items[0].study_uid}")
        for key, items in inv.runs.items()
    }
    pseudo_of = {
        p: (pseudonyms.patient(p) if options.deidentify else p) for p in set(patients.values())
    }
    # Splits by a hash of the pseudonym; patients of the previous version (or of the
    # version being replaced with --force) keep theirs.
    carried = versions.carried_splits(previous or versions.existing(target))
    cases: list[dict[str, Any]] = []
    for key in sorted(runs):
        items = inv.runs[key]
        ann = annotations.get(key)
        if ann is None and not options.include_unlabelled:
            problems.append(
                Problem(
                    key,
                    "run has no usable annotation (not used; "
                    "--include-unlabelled keeps it for semi-supervised training)",
                )
            )
            continue
        if options.deidentify and any(
            str(i.header.get("BurnedInAnnotation", "")).upper() == "YES" for i in items
        ):
            problems.append(
                Problem(key, "Burned In Annotation is YES: pixels may identify the patient")
            )
            continue
        try:
            loaded = load_run([source.fetch(i) for i in items])
        except NodeError as exc:
            problems.append(Problem(key, f"run cannot be decoded: {exc}"))
            continue
        pixels = loaded.run.pixels
        if ann is not None:
            bad = _check_shape(ann, pixels)
            if bad:
                problems.append(Problem(key, bad))
                continue
        patient = patients[key]
        pseudo_patient = pseudo_of[patient]

        def uid(u: str) -> str:
            return pseudonyms.uid(u) if options.deidentify else u

        case_id = (
            hashlib.sha256(f"{pseudonyms.salt}:{key}".encode()).hexdigest()[:16]
            if options.deidentify
            else key
        )
        arrays: dict[str, np.ndarray] = {"pixels": pixels.astype(np.float32)}
        if loaded.run.meta.frame_times_s is not None:
            arrays["frame_times_s"] = np.asarray(loaded.run.meta.frame_times_s, np.float64)
        for role, mask in ann.masks.items() if ann else []:
            arrays[f"mask_{role}"] = mask.astype(bool)
        path = out / "cases" / f"{case_id}.npz"
        save_npz(path, arrays)
        case = {
            "id": case_id,
            "patient": pseudo_patient,
            "split": "",  # below: over the patients that have a usable case
            "kind": ann.kind if ann else "unlabelled",
            "geometry": ann.geometry if ann else None,
            "roles": ann.roles if ann else [],
            "shape": list(pixels.shape),
            # training.phantoms writes Manufacturer SYNTHETIC: such cases are not patients.
            "synthetic": any(
                str(i.header.get("Manufacturer", "")).upper() == "SYNTHETIC" for i in items
            ),
            # Which generator family (or device) a case comes from: the training CLI
            # refuses evaluation-only family B by it (training.gate).
            "meta": {
                **_meta_dict(loaded.run.meta),
                "manufacturer_model_name": str(
                    items[0].header.get("ManufacturerModelName", "") or ""
                ),
            },
            "instances": sorted(uid(i.sop_instance_uid) for i in items),
            "annotations": sorted(uid(u) for u in ann.seg_uids) if ann else [],
            "file": f"cases/{case_id}.npz",
            "sha256": sha256_file(path),
            "notes": [_scrub(n, pseudonyms, options.deidentify) for n in ann.notes] if ann else [],
        }
        cases.append(case)
        if options.export_dicom:
            _export(
                out / "dicom" / case_id,
                [source.fetch(i) for i in items]
                + [source.fetch(s) for s in inv.segs if ann and s.sop_instance_uid in ann.seg_uids],
                pseudonyms,
            )
    # Split over the patients that contribute a case: one whose runs were all set
    # aside must not take the place a small dataset keeps for its val or test split.
    by_pseudonym = patient_split(
        {c["patient"] for c in cases},
        options.test_fraction,
        options.val_fraction,
        options.seed,
        carried,
    )
    for case in cases:
        case["split"] = by_pseudonym[case["patient"]]
        progress(
            f"case {case['id']}: {case['kind']} {case['geometry'] or ''} "
            f"{tuple(case['shape'])} -> {case['split']}"
        )
    cases.sort(key=lambda c: c["id"])
    manifest = {
        "format": FORMAT,
        "name": options.name,
        "version": options.version,
        "source": source.description,
        "deidentification": PROFILE if options.deidentify else "none (identifiers kept)",
        "split": {
            "seed": options.seed,
            "test_fraction": options.test_fraction,
            "val_fraction": options.val_fraction,
            "unit": "patient",
        },
        "cases": cases,
        "counts": _counts(cases),
        "problems": sorted(
            (
                {
                    "uid": pseudonyms.uid(p.uid) if options.deidentify else p.uid,
                    "reason": _scrub(p.reason, pseudonyms, options.deidentify),
                }
                for p in problems
            ),
            key=lambda p: (p["reason"], p["uid"]),
        ),
    }
    if previous is not None:
        manifest["changes"] = versions.diff(previous, manifest, manifest_hash(options.previous))
        progress(
            f"against version {previous.get('version')} ({options.previous}): "
            + versions.describe(manifest["changes"])
        )
    digest = write_manifest(out, manifest)
    (out / "build.json").write_text(
        json.dumps(
            {"build_key": build_key, "manifest_sha256": digest, "options": options.key()},
            indent=1,
            sort_keys=True,
        )
    )
    try:
        versions.commit(target, out, manifest, digest, options.force, progress)
    except versions.VersionError as exc:
        raise DatasetError(str(exc)) from None
    pseudonyms.save(pmap)
    progress(
        f"dataset {target}: {len(cases)} cases, {len(problems)} left out, sha256 {digest[:16]}"
    )
    return manifest


def _previous(options: BuildOptions, out: Path) -> dict[str, Any] | None:
    """The previous version's manifest (``--previous``), checked to be another version."""
    if options.previous is None:
        return None
    prev = versions.existing(Path(options.previous))
    if prev is None:
        raise DatasetError(f"--previous {options.previous}: not a dataset (no manifest.json)")
    if Path(options.previous).resolve() == out:
        raise DatasetError(
            f"--previous {options.previous} is the folder being written: give the new "
            "version its own --out"
        )
    if prev.get("name") == options.name and str(prev.get("version")) == options.version:
        raise DatasetError(
            f"--previous {options.previous} is already {options.name!r} version "
            f"{options.version}: give the new one another --version"
        )
    return prev


def _annotations(source: Source, inv: Inventory) -> tuple[dict[str, Annotation], list[Problem]]:
    resolver = Resolver(inv.run_infos(), [c.header for c in inv.canvases])
    found: list[Annotation] = []
    problems: list[Problem] = []
    for seg in inv.segs:
        result = read_annotation(dcmread(source.fetch(seg)), resolver)
        if isinstance(result, Problem):
            problems.append(result)
        else:
            found.append(result)
    merged, more = merge(found)
    return merged, problems + more


def _counts(cases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {"cases": len(cases), "patients": len({c["patient"] for c in cases})}
    counts["synthetic"] = sum(bool(c.get("synthetic")) for c in cases)
    for key in ("split", "kind"):
        values: dict[str, int] = {}
        for c in cases:
            values[c[key]] = values.get(c[key], 0) + 1
        counts[key] = dict(sorted(values.items()))
    return counts


def _reuse(out: Path, build_key: str) -> dict[str, Any] | None:
    build = out / "build.json"
    if not build.is_file() or not (out / "manifest.json").is_file():
        return None
    if json.loads(build.read_text()).get("build_key") != build_key:
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    for case in manifest["cases"]:
        if "manufacturer_model_name" not in case.get("meta", {}):
            return None  # built before generator families were recorded
        path = out / case["file"]
        if not path.is_file() or sha256_file(path) != case["sha256"]:
            return None
    return manifest


def _export(directory: Path, paths: Sequence[Path], pseudonyms: Pseudonyms) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for p in paths:
        ds = deidentify(dcmread(p), pseudonyms)
        ds.save_as(directory / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


# ---------------------------------------------------------------------------
# Reading a dataset


@dataclass(eq=False)  # identity: pixels and masks are arrays
class Case:
    id: str
    patient: str
    split: str
    kind: str  # "full" | "scribble" | "unlabelled"
    geometry: str | None
    pixels: np.ndarray
    masks: dict[str, np.ndarray]
    frame_times_s: np.ndarray | None
    meta: dict[str, Any]

    @property
    def labelled(self) -> bool:
        return self.kind in ("full", "scribble")

    def run(self) -> Run:
        """The case as the node's pipelines see a run."""
        m = self.meta
        spacing = tuple(m["pixel_spacing_mm"]) if m.get("pixel_spacing_mm") else None
        meta = RunMeta(
            modality=m["modality"],
            sop_class_uid=m["sop_class_uid"],
            rows=m["rows"],
            columns=m["columns"],
            number_of_frames=m["number_of_frames"],
            frame_times_s=self.frame_times_s,
            pixel_spacing_mm=spacing,  # type: ignore[arg-type]
            slice_spacing_mm=m.get("slice_spacing_mm"),
            image_type=tuple(m.get("image_type", ())),
            body_part=m.get("body_part", ""),
            subtracted=bool(m.get("subtracted")),
            is_volume=bool(m.get("is_volume")),
            frame_rate=m.get("frame_rate"),
        )
        return Run(pixels=self.pixels, meta=meta)

    def annotation(self) -> Annotation:
        if not self.labelled or self.geometry is None:
            raise DatasetError(f"case {self.id} has no annotation")
        return Annotation(
            run_key=self.id,
            kind=self.kind,
            geometry=self.geometry,  # type: ignore[arg-type]
            masks=self.masks,
        )


def load_dataset(root: str | Path, verify: bool = True) -> tuple[dict[str, Any], list[Case]]:
    """The manifest and every case; ``verify`` checks each file's sha256 first."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise DatasetError(f"{root} is not a dataset (no manifest.json)")
    manifest = json.loads((root / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{root}: manifest format {manifest.get('format')} (expected {FORMAT})")
    cases = []
    for c in manifest["cases"]:
        path = root / c["file"]
        if verify and sha256_file(path) != c["sha256"]:
            raise DatasetError(f"{path} does not match its sha256 in the manifest")
        with np.load(path, allow_pickle=False) as z:
            masks = {k[5:]: z[k] for k in z.files if k.startswith("mask_")}
            times = z["frame_times_s"] if "frame_times_s" in z.files else None
            pixels = z["pixels"]
        cases.append(
            Case(
                id=c["id"],
                patient=c["patient"],
                split=c["split"],
                kind=c["kind"],
                geometry=c["geometry"],
                pixels=pixels,
                masks=masks,
                frame_times_s=times,
                meta=c["meta"],
            )
        )
    return manifest, cases
