"""How a pipeline says how far its result can be trusted: measures, checks, a verdict.

A pipeline measures what a reader needs to judge its output (vessel fraction,
connectivity, AIF SNR, ...) as :class:`~pipelines.base.Measurement` items, states
for each measure the range a plausible result lies in (:class:`Check`: the
measure, its bounds, what a value outside them means, and how bad that is),
and returns ``PipelineResult(quality=assess(checks))``. :func:`assess` keeps
every measure and gives the result a :class:`Verdict`:

- ``ok``: every check passed;
- ``low_confidence``: at least one check failed whose ``severity`` is
  low confidence; the result is delivered, marked, with the reasons;
- ``failed``: a check with ``severity=FAILED`` failed: the output is not
  usable as it stands (the node then falls back to the classical path when a
  model made it, see ``dicom_node.processing``).

Reasons are sentences a person can act on: the measure, its value, the bound
it crossed and what that means ("vessel fraction 0.01 % below 0.05 %: almost
no vessel found; check that the run holds contrast").

The node writes the verdict, the reasons and the measures into the "Run
quality" group of a TID 1500 SR (``dicom_node.encode.sr``), a line under every
rendering with a "LOW CONFIDENCE: reason" banner when so
(``pipelines.render.quality_panel``), and the job record (:meth:`Quality.notes`:
lines starting with ``verdict:`` and ``quality:``, which ``dicom_node.db``
reads back).

Measure codes: where DICOM has no code for a measure, the private coding scheme
``99ADN`` (angio-dicom-node) names it; :data:`PRIVATE_SCHEME` describes it for the
SR's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from pipelines.base import Code, Measurement

PRIVATE_SCHEME = "99ADN"
PRIVATE_SCHEME_NAME = "angio-dicom-node quality measures"
PERCENT = Code("%", "UCUM", "percent")
RATIO = Code("{ratio}", "UCUM", "ratio")
NO_UNIT = Code("1", "UCUM", "no units")

# Concepts of the verdict in the SR (qualitative evaluation and its reasons).
VERDICT_CONCEPT = Code("VERDICT", PRIVATE_SCHEME, "Result verdict")
REASON_CONCEPT = Code("VERDICTREASON", PRIVATE_SCHEME, "Reason for the verdict")
VERDICT_NOTE = "verdict: "
# Added to the series descriptions of a result the classical path made in place of a
# model's that failed its checks (``dicom_node.processing``).
FALLBACK_SUFFIX = " (classical fallback)"
QUALITY_NOTE = "quality: "


class Verdict(StrEnum):
    """Ordered: a result's verdict is the worst of its checks."""

    OK = "ok"
    LOW_CONFIDENCE = "low_confidence"
    FAILED = "failed"

    @property
    def rank(self) -> int:
        return list(Verdict).index(self)

    @property
    def code(self) -> Code:
        meaning = {"ok": "OK", "low_confidence": "Low confidence", "failed": "Failed"}[self.value]
        return Code(self.value.upper().replace("_", ""), PRIVATE_SCHEME, meaning)

    @property
    def label(self) -> str:
        return self.value.replace("_", " ").upper()


def measure(code_value: str, meaning: str, value: float, unit: Code = PERCENT) -> Measurement:
    """A measure under the private scheme (``code_value``: at most 16 characters)."""
    if len(code_value) > 16:
        raise ValueError(f"code value {code_value!r} is longer than 16 characters")
    return Measurement(Code(code_value, PRIVATE_SCHEME, meaning), float(value), unit)


def describe(m: Measurement) -> str:
    """``vessel fraction 1.2 %`` (three significant digits)."""
    unit = m.unit.value
    if unit in ("1", "{ratio}"):
        shown = ""
    elif unit.startswith("{"):
        shown = " " + unit.strip("{}")  # UCUM annotation: "{frames}"
    else:
        shown = " %" if unit == "%" else f" {unit}"
    value = "not measurable" if not math.isfinite(m.value) else f"{m.value:.3g}{shown}"
    return f"{m.name.meaning.lower()} {value}"


@dataclass(frozen=True)
class Check:
    """One check: ``measurement`` must lie within [``low``, ``high``] (either may be
    None). ``meaning`` says what a value outside means and what to do, for the
    reader; ``severity`` is the verdict when it does not hold. A measure that
    could not be computed (NaN) fails too, unless ``missing_ok`` (nothing to judge,
    e.g. the connectivity of an empty mask, which another check reports)."""

    measurement: Measurement
    meaning: str
    low: float | None = None
    high: float | None = None
    severity: Verdict = Verdict.LOW_CONFIDENCE
    missing_ok: bool = False

    @property
    def verdict(self) -> Verdict:
        """The verdict this check gives when it fails."""
        return self.severity

    def passed(self) -> bool:
        v = self.measurement.value
        if math.isnan(v):
            return self.missing_ok
        return (self.low is None or v >= self.low) and (self.high is None or v <= self.high)

    def reason(self) -> str:
        """Why it failed, as a sentence (empty when it passed)."""
        if self.passed():
            return ""
        m = self.measurement
        if math.isnan(m.value) or (m.value == 0 and self.low is not None and self.low <= 1e-6):
            return f"{describe(m)}: {self.meaning}"  # none at all: no bound to quote
        bound, word = (
            (self.low, "below")
            if self.low is not None and m.value < self.low
            else (self.high, "above")
        )
        limit = replace(m, value=float(bound if bound is not None else math.nan))
        shown = describe(limit).removeprefix(m.name.meaning.lower() + " ")
        return f"{describe(m)} {word} {shown}: {self.meaning}"


@dataclass(frozen=True)
class Quality:
    """The measures of one result, its verdict and the reasons for it."""

    measures: tuple[Measurement, ...] = ()
    verdict: Verdict = Verdict.OK
    reasons: tuple[str, ...] = ()
    # Set when the node replaced a model's output by the classical path.
    fallback: str = ""

    def summary(self, limit: int = 4) -> str:
        """One line of the first ``limit`` finite measures."""
        shown = [describe(m) for m in self.measures if math.isfinite(m.value)][:limit]
        return ", ".join(shown)

    def banner(self) -> str:
        """``LOW CONFIDENCE: reason`` (or ``FAILED: reason``); empty when ok."""
        if self.verdict is Verdict.OK:
            return ""
        first = self.reasons[0] if self.reasons else "no reason recorded"
        return f"{self.verdict.label}: {first}"

    def notes(self) -> list[str]:
        """Job-record lines: ``verdict: <verdict>[: reasons]`` and ``quality: <measures>``."""
        head = VERDICT_NOTE + self.verdict.value
        if self.reasons:
            head += ": " + "; ".join(self.reasons)
        lines = [head]
        if self.measures:
            lines.append(QUALITY_NOTE + ", ".join(describe(m) for m in self.measures))
        if self.fallback:
            lines.append(self.fallback)
        return lines

    def with_fallback(self, why: str) -> Quality:
        return replace(self, fallback=why, reasons=(*self.reasons, why))


def assess(checks: Iterable[Check], extra: Sequence[Measurement] = ()) -> Quality:
    """Combine checks into a :class:`Quality`: every measure kept once (``extra``:
    measures reported without a bound), the verdict the worst of the failed checks,
    their reasons worst first. Several checks may bound one measure (a low-confidence
    and a failed bound): only the worst failed one gives a reason."""
    checks = list(checks)
    failed = sorted(
        (c for c in checks if not c.passed()), key=lambda c: c.verdict.rank, reverse=True
    )
    reasons: list[str] = []
    judged: set[Code] = set()
    for c in failed:
        if c.measurement.name not in judged:
            judged.add(c.measurement.name)
            reasons.append(c.reason())
    measures: dict[Code, Measurement] = {}
    for m in [c.measurement for c in checks] + list(extra):
        measures.setdefault(m.name, m)
    return Quality(
        measures=tuple(measures.values()),
        verdict=failed[0].verdict if failed else Verdict.OK,
        reasons=tuple(reasons),
    )


def combine(*parts: Quality | None) -> Quality | None:
    """Several assessments of one result (e.g. per output) as one: measures and reasons
    joined, the worst verdict."""
    found = [p for p in parts if p is not None]
    if not found:
        return None
    return Quality(
        measures=tuple(m for p in found for m in p.measures),
        verdict=max((p.verdict for p in found), key=lambda v: v.rank),
        reasons=tuple(r for p in found for r in p.reasons),
        fallback=next((p.fallback for p in found if p.fallback), ""),
    )


def verdict_from_notes(notes: Iterable[str]) -> str | None:
    """The verdict a job's notes record (see :meth:`Quality.notes`), or None."""
    for line in notes:
        if line.startswith(VERDICT_NOTE):
            word = line[len(VERDICT_NOTE) :].split(":", 1)[0].strip()
            return word if word in {v.value for v in Verdict} else None
    return None
