"""Declarative routing: the first rule whose conditions all hold names the pipelines and
destinations of a run. Conditions compare header values and a few derived run
features (subtracted, volume, frame rate); regexes are compiled, never ``eval``'d.
A run no rule matches goes to no pipeline and is reported as unrouted.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

from dicom_node import MANUFACTURER
from dicom_node.settings import Match, Rule, Settings, TagPattern
from dicom_node.sopclasses import CINE_2D, VOLUME, resolve_sop_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFeatures:
    """What routing looks at: the first instance's header and derived facts."""

    header: Dataset
    calling_aet: str
    instance_count: int
    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...]
    subtracted: bool
    is_volume: bool
    number_of_frames: int
    frame_rate: float | None

    @classmethod
    def from_headers(cls, headers: Sequence[Dataset], calling_aet: str = "") -> RunFeatures:
        return cls.from_first(headers[0], len(headers), calling_aet)

    @classmethod
    def from_first(
        cls,
        first: Dataset,
        instance_count: int,
        calling_aet: str = "",
        frames: int | None = None,
    ) -> RunFeatures:
        """The features of a run from its first instance's header and its size
        (``frames``: its instances' frames, as the index holds them): rules read
        nothing else, so a run of thousands of instances costs one header."""
        sop = str(first.get("SOPClassUID", ""))
        image_type = tuple(str(v).upper() for v in (first.get("ImageType") or []))
        own = int(first.get("NumberOfFrames", 1) or 1)
        if instance_count == 1:
            frames = own
        elif frames is None or "ConcatenationUID" not in first or sop not in CINE_2D:
            frames = instance_count  # a series: a frame (or a slice) an instance
        subtracted = (
            "SUBTRACTION" in image_type
            or mask_operation(first) in SUBTRACTING_MASK_OPERATIONS
            or str(first.get("RecommendedViewingMode", "")).upper() == "SUB"
        )
        is_volume = sop in VOLUME and (own > 1 or instance_count > 1)
        return cls(
            header=first,
            calling_aet=calling_aet,
            instance_count=instance_count,
            sop_class_uid=sop,
            modality=str(first.get("Modality", "")),
            image_type=image_type,
            subtracted=subtracted,
            is_volume=is_volume,
            number_of_frames=frames,
            frame_rate=frame_rate(first) if sop in CINE_2D else None,
        )


SUBTRACTING_MASK_OPERATIONS = ("AVG_SUB", "TID")


def mask_operation(ds: Dataset) -> str:
    """The first Mask Subtraction Sequence item's Mask Operation ('' when none).

    'NONE' (seen in real cardiac XA) means the run is not to be subtracted.
    """
    msq = ds.get("MaskSubtractionSequence")
    return str(msq[0].get("MaskOperation", "")).upper() if msq else ""


# Where a run's acquisition time is read, most specific first: (date time, or
# date and time) keywords.
ACQUISITION_TIMES = (
    ("AcquisitionDateTime", None),
    ("AcquisitionDate", "AcquisitionTime"),
    ("SeriesDate", "SeriesTime"),
    ("StudyDate", "StudyTime"),
    ("ContentDate", "ContentTime"),
)


def acquired_at(ds: Dataset) -> dt.datetime | None:
    """When the run was acquired, from the first of ``ACQUISITION_TIMES`` that its
    header holds and pydicom can read (a date without a time is its start); None
    when none can be read. A value with a UTC offset (DT, or Timezone Offset From
    UTC) is aware; others are naive, the modality's local time. A header defect is
    logged (the keyword, not the value) and the next source is tried."""
    for date_key, time_key in ACQUISITION_TIMES:
        try:
            raw = ds.get(date_key)
            if not raw:
                continue
            if time_key is None:
                value: dt.datetime = DT(str(raw))
            else:
                time = ds.get(time_key)
                value = dt.datetime.combine(DA(str(raw)), TM(str(time)) if time else dt.time())
            offset = ds.get("TimezoneOffsetFromUTC")
            if value.tzinfo is None and offset:
                value = value.replace(tzinfo=DT(f"{value:%Y%m%d%H%M%S}{offset}").tzinfo)
            return value
        except Exception:  # noqa: BLE001 - pydicom raises ValueError and its parser's errors
            log.warning("%s cannot be read as a date and time; ignored", date_key)
    return None


def header_floats(ds: Dataset, keyword: str) -> list[float] | None:
    """A numeric element as a list of finite floats; None when absent, empty or unreadable
    (a value like 'abc' is logged, never raised: a header defect must not stop routing)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises its parser's errors (text in an FL)
        log.warning("%s cannot be read as its VR; ignored", keyword)
        return None
    if value is None or value == "":
        return None
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        log.warning("%s is not numeric; ignored", keyword)  # the value is not logged
        return None
    if not all(math.isfinite(v) for v in out):
        log.warning("%s is not finite; ignored", keyword)
        return None
    return out


def frame_rate(ds: Dataset) -> float | None:
    """Acquisition frame rate from Frame Time, Frame Time Vector or Cine Rate (frames/s);
    None when the header gives none that is usable."""
    ft = header_floats(ds, "FrameTime")
    if ft is not None and len(ft) == 1 and ft[0] > 0:
        return 1000.0 / ft[0]
    ftv = header_floats(ds, "FrameTimeVector")
    if ftv is not None and len(ftv) > 1:
        steps = [v for v in ftv[1:] if v > 0]
        if steps:
            return 1000.0 * len(steps) / sum(steps)
    rate = header_floats(ds, "CineRate")
    if rate is not None and len(rate) == 1 and rate[0] > 0:
        return rate[0]
    return None


@dataclass
class Check:
    condition: str
    ok: bool
    detail: str


@dataclass
class Decision:
    rule: Rule | None
    checks: list[tuple[str, list[Check]]] = field(default_factory=list)
    # Why no rule was asked (the run is a result of this node's kind).
    excluded: str | None = None

    @property
    def pipelines(self) -> list[str]:
        return list(self.rule.pipelines) if self.rule else []

    def explain(self) -> str:
        if self.excluded:
            return f"  -> not routed: {self.excluded}"
        lines = []
        for name, checks in self.checks:
            verdict = "MATCH" if all(c.ok for c in checks) else "no match"
            lines.append(f"  rule {name!r}: {verdict}")
            for c in checks:
                lines.append(f"    [{'x' if c.ok else ' '}] {c.condition}: {c.detail}")
        if self.rule is None:
            lines.append("  -> no rule matched: the run goes to no pipeline (reported as unrouted)")
        else:
            lines.append(
                f"  -> rule {self.rule.name!r}: pipelines {self.rule.pipelines or 'none'}, "
                f"destinations {self.rule.destinations}"
            )
        return "\n".join(lines)


def _tag_value(header: Dataset, keyword: str) -> list[str]:
    if keyword not in header:
        return [""]
    value = header.data_element(keyword).value  # type: ignore[union-attr]
    if value is None:
        return [""]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value] or [""]
    return [str(value)]


def _check_tag(header: Dataset, keyword: str, want: str | list[str] | TagPattern) -> Check:
    got = _tag_value(header, keyword)
    if isinstance(want, TagPattern):
        ok = any(re.search(want.regex, g) for g in got)
        return Check(f"{keyword} ~ /{want.regex}/", ok, f"value {got}")
    options = [want] if isinstance(want, str) else want
    ok = any(g in options for g in got)
    return Check(f"{keyword} in {options}", ok, f"value {got}")


def evaluate(match: Match, f: RunFeatures) -> list[Check]:
    checks: list[Check] = []
    if match.sop_class_uid:
        uids = [resolve_sop_class(s) for s in match.sop_class_uid]
        checks.append(Check("SOP Class UID", f.sop_class_uid in uids, f.sop_class_uid))
    if match.modality:
        checks.append(
            Check(f"Modality in {match.modality}", f.modality in match.modality, f.modality)
        )
    if match.image_type:
        ok = all(v.upper() in f.image_type for v in match.image_type)
        checks.append(Check(f"Image Type has {match.image_type}", ok, "\\".join(f.image_type)))
    if match.not_image_type:
        ok = not any(v.upper() in f.image_type for v in match.not_image_type)
        checks.append(
            Check(f"Image Type lacks {match.not_image_type}", ok, "\\".join(f.image_type))
        )
    if match.calling_aet:
        checks.append(
            Check(
                f"calling AE in {match.calling_aet}",
                f.calling_aet in match.calling_aet,
                f.calling_aet,
            )
        )
    if match.subtracted is not None:
        checks.append(
            Check(
                f"subtracted is {match.subtracted}",
                f.subtracted == match.subtracted,
                "SUBTRACTION in Image Type or a Mask Subtraction Sequence"
                if f.subtracted
                else "no subtraction",
            )
        )
    if match.is_volume is not None:
        checks.append(
            Check(
                f"volume is {match.is_volume}",
                f.is_volume == match.is_volume,
                f"{f.instance_count} instance(s), {f.number_of_frames} frame(s)",
            )
        )
    rate = f.frame_rate
    if match.frame_rate_min is not None:
        ok = rate is not None and rate >= match.frame_rate_min
        checks.append(Check(f"frame rate >= {match.frame_rate_min}/s", ok, f"{rate}"))
    if match.frame_rate_max is not None:
        ok = rate is not None and rate <= match.frame_rate_max
        checks.append(Check(f"frame rate <= {match.frame_rate_max}/s", ok, f"{rate}"))
    if match.min_frames is not None:
        checks.append(
            Check(
                f"frames >= {match.min_frames}",
                f.number_of_frames >= match.min_frames,
                str(f.number_of_frames),
            )
        )
    for keyword, want in match.tags.items():
        checks.append(_check_tag(f.header, keyword, want))
    return checks


# A node's own results, sent back to it (a PACS that routes every CT to the node
# returns the rotational pipeline's CT volumes), would be processed again, their
# results again, without end.
OWN_RESULT = (
    f"a result of an angio DICOM node (Manufacturer {MANUFACTURER}): results are not "
    "processed again"
)


def route(rules: Sequence[Rule], features: RunFeatures) -> Decision:
    if str(features.header.get("Manufacturer", "") or "").strip() == MANUFACTURER:
        return Decision(rule=None, excluded=OWN_RESULT)
    decision = Decision(rule=None)
    for rule in rules:
        checks = evaluate(rule.match, features)
        decision.checks.append((rule.name, checks))
        if all(c.ok for c in checks):
            decision.rule = rule
            break
    return decision


def effective_rules(settings: Settings) -> list[Rule]:
    """The configured rules, or the built-in defaults when none are written."""
    return settings.rules if settings.rules is not None else default_rules()


_CEREBRAL = TagPattern(regex=r"(?i)^$|HEAD|BRAIN|SKULL|NECK|CAROTID|CEREBR|CRAN")
_CARDIAC = TagPattern(regex=r"(?i)HEART|CORONARY|CARDIAC|CHEST|THORAX")


def default_rules() -> list[Rule]:
    """Rules that tell the kinds of angiography apart with no configuration.

    - 3D: X-Ray 3D Angiographic or CT volumes -> mask-free 3D angiography.
    - Coronary cine: unsubtracted XA of the heart, or fast unsubtracted cine.
    - Cerebral DSA: subtracted XA (or native with a Mask Subtraction Sequence)
      of the head and neck, or with no body part given.
    Anything else (single frames, SEG annotations, other body parts) is stored
    and reported as unrouted.
    """
    import pipelines

    known = set(pipelines.names())

    def available(*names: str) -> list[str]:
        return [n for n in names if n in known]

    xa = ["XRayAngiographicImageStorage", "EnhancedXAImageStorage"]
    return [
        Rule(
            name="rotational-3d",
            match=Match(
                sop_class_uid=[
                    "XRay3DAngiographicImageStorage",
                    "CTImageStorage",
                    "EnhancedCTImageStorage",
                ],
                is_volume=True,
                tags={"BodyPartExamined": _CEREBRAL},
            ),
            pipelines=available("rotational_dla"),
        ),
        Rule(
            name="coronary-cine",
            match=Match(
                sop_class_uid=xa,
                subtracted=False,
                min_frames=2,
                tags={"BodyPartExamined": _CARDIAC},
            ),
            pipelines=available("xa_coronary"),
        ),
        Rule(
            name="coronary-cine-by-rate",
            match=Match(sop_class_uid=xa, subtracted=False, min_frames=2, frame_rate_min=12.5),
            pipelines=available("xa_coronary"),
        ),
        Rule(
            name="cerebral-dsa",
            match=Match(
                sop_class_uid=xa,
                subtracted=True,
                min_frames=2,
                tags={"BodyPartExamined": _CEREBRAL},
            ),
            pipelines=available("minip", "dsa_av", "dsa_perfusion"),
        ),
    ]
