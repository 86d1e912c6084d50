"""An algorithm's version follows its output.

Result UIDs are derived from the source, the pipeline and its algorithms' names and
versions (``dicom_node.encode.common.EncodeContext.result_uid``), so a change of
output under an unchanged version would give a re-run the UIDs of the earlier,
different content: the PACS would keep one and drop the other. Each classical path
runs here on a small phantom, through the node's own run loader; its output
(masks, map values, measurements, quality verdict, reasons and measures; not the
drawing of the renderings) is reduced to a signature recorded with the algorithm
versions in ``algorithm_signatures.json``. A change of output that keeps the
version fails; bump the pipeline's ``VERSION`` (with a line saying what changed)
and record the new signature (``ANGIO_RECORD_SIGNATURES=1`` writes it).

The signature is numbers compared with a tolerance, not a hash. The same code gives
outputs that differ in the last bits on the two kinds of machine CI runs on (Intel
and AMD: their BLAS and SIMD paths); a hash of rounded values then differs wherever
one value of thousands lies at a rounding boundary, and each version needed one
hash per kind of machine, of which only the local one could be recorded. Per
output: each mask's pixel count (within ``COUNT_TOLERANCE`` of it, at least 2
pixels), each float array's shape and mean and mean absolute value, each float
(relative ``FLOAT_TOLERANCE``); every text with its numbers taken out, and those
numbers within one unit of their last printed digit (or ``FLOAT_TOLERANCE``). A
change smaller than these passes unseen: the price of a test that does not fail on
a machine it was not recorded on.

Some outputs sit near a threshold on the phantom, and the last bits move them across
it: ``dsa_perfusion`` 1.5.0's brain without a value is 10.3 % on Intel and 11.4 % on
AMD (a perturbation of the pixels by 1e-5 moves it as much). So a version may hold one
signature per kind of machine (the CPU vendor, and whether OpenBLAS runs AVX-512
kernels: :func:`machine`), each recorded there; a run matches when
it is within the tolerance of any of them. Recording adds a kind that has none yet and
never replaces the signature of a kind already recorded (:func:`record`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from functools import cache
from pathlib import Path

import numpy as np
import pytest

import pipelines
from dicom_node.runs import load_run
from pipelines.base import (
    AlgorithmInfo,
    PipelineContext,
    PipelineResult,
    RenderingOutput,
)
from training.phantoms import coronary, dsa, rotational

RECORDED = Path(__file__).with_name("algorithm_signatures.json")
# A pixel at a threshold may flip on the other machine, and a hysteresis or a
# largest-component rule may carry a few more with it; a change of the algorithm
# moves more than this.
COUNT_TOLERANCE = 0.01
FLOAT_TOLERANCE = 0.01
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")

Signature = dict[str, object]


def _walk(out: Signature, path: str, value: object) -> None:
    if isinstance(value, AlgorithmInfo):
        return  # the version is what is checked, not part of the content
    if isinstance(value, np.ndarray):
        out[f"{path}.shape"] = str(value.shape)
        if value.dtype == bool:
            out[f"{path}.count"] = int(value.sum())
        elif value.size:
            v = np.asarray(value, dtype=np.float64)
            finite = v[np.isfinite(v)]
            out[f"{path}.finite"] = int(finite.size)
            if finite.size:
                out[f"{path}.mean"] = float(finite.mean())
                out[f"{path}.mean_abs"] = float(np.abs(finite).mean())
    elif isinstance(value, bool) or value is None:
        out[path] = repr(value)
    elif isinstance(value, (int, float, np.integer, np.floating)):
        out[path] = float(value)
    elif isinstance(value, str):
        out[f"{path}.text"] = _NUMBER.sub("#", value)
        for i, number in enumerate(_NUMBER.findall(value)):
            out[f"{path}.n{i}"] = number
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _walk(out, f"{path}.{f.name}", getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        out[f"{path}.len"] = len(value)
        for i, item in enumerate(value):
            _walk(out, f"{path}[{i}]", item)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            _walk(out, f"{path}[{key}]", value[key])
    else:
        _walk(out, path, str(value) if not hasattr(value, "value") else value.value)


def signature(result: PipelineResult) -> Signature:
    out: Signature = {}
    for i, o in enumerate(result.outputs):
        if not isinstance(o, RenderingOutput):
            _walk(out, f"{i}:{type(o).__name__}", o)
    if result.quality is not None:
        _walk(out, "verdict", result.quality.verdict.value)
        _walk(out, "reasons", list(result.quality.reasons))
        _walk(out, "measures", list(result.quality.measures))
    return out


def _same(key: str, a: object, b: object) -> bool:
    if key.endswith(".count") and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= max(2.0, COUNT_TOLERANCE * max(abs(a), abs(b)))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_TOLERANCE, abs_tol=1e-9) or (
            math.isnan(a) and math.isnan(b)
        )
    if re.fullmatch(r".*\.n\d+", key) and isinstance(a, str) and isinstance(b, str):
        # a printed number: within one unit of its last digit, or FLOAT_TOLERANCE
        places = max(len(a.partition(".")[2]), len(b.partition(".")[2]))
        try:
            x, y = float(a), float(b)
        except ValueError:
            return a == b
        return abs(x - y) <= max(1.01 * 10.0**-places, FLOAT_TOLERANCE * max(abs(x), abs(y)))
    return a == b


def differences(recorded: Signature, found: Signature) -> list[str]:
    keys = sorted(set(recorded) | set(found))
    return [
        f"{k}: {recorded.get(k, '(none)')!r} -> {found.get(k, '(none)')!r}"
        for k in keys
        if k not in recorded or k not in found or not _same(k, recorded[k], found[k])
    ]


def algorithms(result: PipelineResult) -> tuple[str, ...]:
    found = {
        f"{a.name} {a.version}"
        for out in result.outputs
        if isinstance(a := getattr(out, "algorithm", None), AlgorithmInfo)
    }
    return tuple(sorted(found))


@cache
def _runs(folder: Path) -> dict[str, Path]:
    paths = {
        "dsa": dsa.generate(21, size=128, frames=12, fps=2.0).write(folder / "dsa")[0],
        "coronary": coronary.generate(21, size=96, frames=8).write(folder / "cine")[0],
    }
    volume = rotational.generate(21, size=48).write(folder / "rot")[0].parent
    paths["rotational"] = volume
    return paths


CASES = {
    "dsa_av": "dsa",
    "dsa_ia": "dsa",
    "dsa_perfusion": "dsa",
    "xa_coronary": "coronary",
    "rotational_dla": "rotational",
}


# OpenBLAS's kernels for these cores use AVX-512 (``OPENBLAS_CORETYPE`` names one).
_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def machine() -> str:
    """The kind of CPU a signature was recorded on: its vendor, and " AVX-512" where
    OpenBLAS (numpy's and scipy's BLAS) runs its AVX-512 kernels. The BLAS and SIMD
    paths that make the last bits differ follow both: an AMD EPYC with AVX-512 gets
    OpenBLAS's SkylakeX kernels, and its dsa_av timing overlap on the phantom below
    was 2.09 against 2.41 with the Zen or Haswell kernels, whatever the numpy, scipy
    and scikit-image versions (2026-12-05)."""
    vendor = platform.machine() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.partition(":")[2].strip()
            elif line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
    except OSError:
        pass
    core = os.environ.get("OPENBLAS_CORETYPE", "").lower()
    avx512 = core in _AVX512_CORES if core else "avx512f" in flags
    return vendor + (" AVX-512" if avx512 else "")


def record(table: dict, pipeline: str, versions: list[str], found: Signature) -> None:
    """Record ``found`` for ``versions``: a new version replaces every signature; the same
    version adds this machine's signature where none of this kind of machine is recorded
    yet (a pipeline whose output sits near a threshold differs between Intel and AMD by
    more than the tolerance). A different signature on a machine of a recorded kind is a
    change of output: it is not recorded, the test fails and asks for a new version."""
    entry = table.get(pipeline)
    here = machine()
    if entry is None or entry["versions"] != versions:
        table[pipeline] = {
            "versions": versions,
            "signatures": [{"machine": here, "signature": found}],
        }
        return
    kept = list(entry["signatures"])
    new = all(differences(k["signature"], found) for k in kept)
    if new and all(k["machine"] != here for k in kept):
        kept.append({"machine": here, "signature": found})
    table[pipeline] = {"versions": versions, "signatures": kept}


@pytest.mark.parametrize("pipeline", sorted(CASES))
def test_output_changes_come_with_a_new_algorithm_version(
    pipeline: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = _runs(tmp_path_factory.getbasetemp() / "algorithm-versions")
    source = folder[CASES[pipeline]]
    files = sorted(source.glob("*.dcm")) if source.is_dir() else [source]
    loaded = load_run(files)
    result = pipelines.get(pipeline)(loaded.run, PipelineContext())
    versions, found = list(algorithms(result)), signature(result)
    assert versions, f"{pipeline}: no output names its algorithm"
    table = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
    if os.environ.get("ANGIO_RECORD_SIGNATURES") == "1":
        record(table, pipeline, versions, found)
        RECORDED.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    recorded = table.get(pipeline)
    assert recorded is not None, f"record {pipeline!r} (ANGIO_RECORD_SIGNATURES=1)"
    changes = [differences(k["signature"], found) for k in recorded["signatures"]]
    changed = min(changes, key=len)
    if changed:
        assert versions != recorded["versions"], (
            f"{pipeline}'s output changed under the same algorithm version {versions}: bump "
            "its VERSION, then record it (ANGIO_RECORD_SIGNATURES=1); " + "; ".join(changed[:8])
        )
    assert versions == recorded["versions"] and not changed, (
        f"{pipeline}: record the new versions {versions} (ANGIO_RECORD_SIGNATURES=1)"
    )


def test_a_second_kind_of_machine_is_recorded_and_a_change_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Recording keeps one signature per kind of machine for a version; a different
    output on a kind already recorded is not written over (it needs a new version)."""
    first: Signature = {"m.count": 5000, "a.mean": 1.2345}
    other: Signature = {"m.count": 5000, "a.mean": 1.30}
    table: dict = {}
    monkeypatch.setattr(__name__ + ".machine", lambda: "GenuineIntel")
    record(table, "p", ["p 1.0"], first)
    monkeypatch.setattr(__name__ + ".machine", lambda: "AuthenticAMD")
    record(table, "p", ["p 1.0"], other)
    assert [k["machine"] for k in table["p"]["signatures"]] == ["GenuineIntel", "AuthenticAMD"]
    changed: Signature = {"m.count": 5000, "a.mean": 1.40}
    record(table, "p", ["p 1.0"], changed)
    assert all(differences(k["signature"], changed) for k in table["p"]["signatures"])
    record(table, "p", ["p 1.1"], changed)
    assert table["p"]["signatures"] == [{"machine": "AuthenticAMD", "signature": changed}]


def test_the_signature_tolerates_the_last_bits_and_not_a_change() -> None:
    """What the tolerance lets through: float noise and a printed last digit; not a
    changed mask, value or text."""
    base: Signature = {"m.count": 5000, "a.mean": 1.2345, "r.text": "AIF # s", "r.n0": "0.36"}
    assert not differences(base, {**base, "m.count": 5040, "a.mean": 1.2345001, "r.n0": "0.37"})
    assert differences(base, {**base, "m.count": 5100})
    assert differences(base, {**base, "a.mean": 1.25})
    assert differences(base, {**base, "r.n0": "0.40"})
    assert differences(base, {**base, "r.text": "earliest brain # s"})
    assert differences(base, {k: v for k, v in base.items() if k != "a.mean"})
