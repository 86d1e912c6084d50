"""Domain randomisation: the priors every family A generator draws its appearance from.

Why: a model trained on one fixed appearance learns the generator, not
angiography. With ``randomise=True`` (or a priors instance) each generator
draws geometry, contrast, acquisition, artefacts and 3D reconstruction
properties per seed from the wide ranges below; each field says why real runs
vary that much (``docs/phantoms.md`` has the same tables). Without it the
generators keep their fixed default appearance, byte for byte.

Narrow or widen a prior with ``dataclasses.replace(priors.DSA, snr=(30, 30))``.
``python -m training.phantoms.priors`` prints the tables of docs/phantoms.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.phantoms.errors import PhantomOptionError

Range = tuple[float, float]
SHUTTER_KINDS = ("RECTANGULAR", "POLYGONAL", "CIRCULAR", "CIRCULAR+RECTANGULAR")
GROUPS = ("geometry", "contrast", "acquisition", "besides anatomy", "3D")


def _p(default: Any, why: str, unit: str = "", log: bool = False, group: str = "") -> Any:
    """A prior: its default, and for the docs table the unit, the reason and the group."""
    return field(default=default, metadata={"why": why, "unit": unit, "log": log, "group": group})


def _geo(default: Any, why: str, unit: str = "", log: bool = False) -> Any:
    return _p(default, why, unit, log, "geometry")


def _con(default: Any, why: str, unit: str = "", log: bool = False) -> Any:
    return _p(default, why, unit, log, "contrast")


def _acq(default: Any, why: str, unit: str = "", log: bool = False) -> Any:
    return _p(default, why, unit, log, "acquisition")


def _ext(default: Any, why: str, unit: str = "", log: bool = False) -> Any:
    return _p(default, why, unit, log, "besides anatomy")


def _vol(default: Any, why: str, unit: str = "", log: bool = False) -> Any:
    return _p(default, why, unit, log, "3D")


@dataclass(frozen=True)
class AnatomyPriors:
    """Cerebral anatomy variation, shared by ``dsa`` and ``rotational`` (same seed, same patient)."""

    calibre_scale: Range = _geo(
        (0.8, 1.25),
        "adult ICA 3.5-5.5 mm, M1 2-3.5 mm: calibre scales with body size and sex and falls "
        "with age, vasospasm and small-vessel disease",
    )
    vein_calibre_scale: Range = _geo(
        (0.75, 1.3), "sinus size and dominance vary more than arterial calibres"
    )
    tortuosity_mm: Range = _geo(
        (0.0, 1.8),
        "tortuosity grows with age and hypertension; loops and kinks of the cervical ICA are "
        "seen in 10-40 % of angiograms (amplitude of a smooth bend field)",
        "mm",
    )
    tortuosity_wavelength_mm: Range = _geo((6.0, 22.0), "scale of those bends", "mm")
    control_jitter_scale: Range = _geo(
        (1.0, 2.5), "trunk courses (siphon, M1, A1) differ between people by several mm"
    )
    branch_scale: Range = _geo(
        (0.55, 1.6),
        "the number of visible cortical branches depends on territory size, collaterals, "
        "atrophy and how far the contrast reaches",
    )
    aneurysm_count_p: tuple[float, ...] = _geo(
        (0.6, 0.3, 0.1),
        "P(0, 1, 2 aneurysms): about 3 % of adults carry an unruptured aneurysm, patients "
        "referred for cerebral angiography far more often, and 20-30 % of them have several",
    )
    aneurysm_radius_mm: Range = _geo(
        (1.5, 7.0), "most aneurysms are 3-10 mm wide; giant ones reach 25 mm", "mm", log=True
    )
    stenosis_count_p: tuple[float, ...] = _geo(
        (0.55, 0.3, 0.15), "P(0, 1, 2 stenoses): atherosclerotic and intracranial stenoses"
    )
    stenosis_severity: Range = _geo(
        (0.3, 0.85), "diameter reduction, from mild to near occlusion (NASCET 30-99 %)"
    )
    stenosis_length_mm: Range = _geo((2.0, 10.0), "focal to tandem lesions", "mm")
    coil_p: float = _ext(0.3, "follow-up runs of a coiled aneurysm (platinum coil mass)")
    clip_p: float = _ext(0.15, "surgical aneurysm clips from earlier treatment")


@dataclass(frozen=True)
class XAPriors:
    """Acquisition, display and artefact priors common to the 2D runs."""

    matrix: Range = _geo(
        (512, 1024),
        "flat-panel C-arms store 512^2 to 1024^2 (binned or full resolution); rectangular "
        "detectors and exports give non-square matrices (1240x960, 464x512)",
        "px",
    )
    square_p: float = _geo(0.6, "share of square matrices")
    detector_field_mm: Range = _geo(
        (160.0, 420.0),
        "zoom modes of 48, 42, 32, 22 and 16 cm flat panels; pixel spacing at the isocentre "
        "is this field over magnification and matrix (0.1-0.6 mm)",
        "mm",
    )
    magnification: Range = _geo(
        (1.15, 1.8),
        "source-detector 950-1250 mm with the patient near the isocentre: operators raise and "
        "lower the detector",
    )
    centre_shift_mm: float = _geo(
        20.0, "operators pan the table to the region of interest", "mm (max per axis)"
    )
    iodine_mg_ml: Range = _con(
        (150.0, 370.0),
        "iohexol, iopamidol, iodixanol at 240-370 mgI/mL, often diluted with saline for "
        "cerebral runs",
        "mgI/mL",
    )
    injection_rate_ml_s: Range = _con(
        (2.0, 8.0),
        "ICA 4-6 mL/s, CCA 6-8, vertebral 3-4; coronary hand injections 2-4 mL/s",
        "mL/s",
    )
    injection_s: Range = _con((0.6, 3.0), "injection duration: how long the plateau lasts", "s")
    bolus_peak: Range = _con(
        (0.25, 0.85),
        "fraction of full-strength contrast in arterial blood: injection rate against the "
        "vessel's own flow (ICA about 4 mL/s) and mixing",
    )
    partial_filling_p: float = _con(
        0.4,
        "inflow of unopacified blood (other ICA, vertebrals, collaterals) and selective "
        "catheter positions leave branches partly filled",
    )
    partial_filling_factor: Range = _con((0.3, 0.8), "their share of the full concentration")
    fps_fast: tuple[float, ...] = _acq(
        (1.0, 2.0, 3.0, 4.0, 4.0, 6.0, 7.5, 10.0, 15.0, 30.0),
        "DSA programs run 1-6 fps in the arterial phase, 7.5-30 fps for fistulas and "
        "malformations (a repeated value weighs double)",
        "fps",
    )
    fps_slow: tuple[float, ...] = _acq(
        (0.5, 1.0, 1.0, 2.0), "vendor programs slow to 0.5-2 fps for the venous phase", "fps"
    )
    constant_rate_p: float = _acq(0.35, "many runs keep one rate throughout")
    frame_jitter: Range = _acq(
        (0.0, 0.08),
        "actual pulse times jitter with the generator and exposure control (recorded in the "
        "Frame Time Vector)",
        "relative SD",
    )
    frame_drop_p: float = _acq(0.2, "runs with a dropped frame")
    bits: tuple[int, ...] = _acq(
        (10, 12, 14, 16),
        "image-intensifier systems stored 10 bits, flat panels 12-16 bits (8 after JPEG)",
        "bits",
    )
    display_gain: Range = _acq(
        (0.5, 2.0), "each vendor maps log values to its own scale and offset", log=True
    )
    snr: Range = _acq(
        (15.0, 150.0),
        "0.3-5 uGy per frame at the detector: low-dose versus high-quality programs, patient "
        "thickness, automatic exposure control (ICA contrast over noise)",
        log=True,
    )
    electronic_noise: Range = _acq(
        (0.0, 0.4), "flat-panel readout noise, relative to the quantum noise of the field"
    )
    blur_mm: Range = _acq(
        (0.1, 0.45),
        "focal spot 0.3-1.0 mm (geometric unsharpness grows with magnification), CsI "
        "scintillator spread, 2x2 binning",
        "mm",
    )
    scatter_ratio: Range = _acq(
        (0.2, 0.8), "scatter-to-primary 0.3-0.6 in the head behind a grid, more without"
    )
    vignetting: Range = _acq(
        (0.0, 0.3),
        "image intensifiers lose 20-40 % at the edge; flat panels keep calibration residuals",
    )
    heel: Range = _acq((0.0, 0.12), "anode heel effect: a gradient across the field")
    grid_p: float = _acq(
        0.5,
        "stationary grids (40-80 lines/cm) alias into stripes or moire near the pixel pitch",
    )
    grid_amplitude: Range = _acq((0.005, 0.04), "stripe contrast")
    grid_frequency: Range = _acq((0.05, 0.45), "aliased stripe frequency", "cycles/px")
    jpeg_p: float = _acq(
        0.25,
        "archives and teaching files keep runs as 8-bit baseline JPEG: 8x8 blocking, ringing",
    )
    jpeg_quality: Range = _acq((40.0, 95.0), "JPEG quality factor")
    shutter_p: float = _ext(
        0.7,
        "operators collimate to cut dose and scatter (rectangular blades, iris, octagonal "
        "displays); written to the Display Shutter module",
    )
    shutter_kinds: tuple[str, ...] = _ext(SHUTTER_KINDS, "shapes, drawn with equal weight")
    shutter_transmission: Range = _ext(
        (0.0005, 0.005),
        "1-2 mm of lead passes well under 1 % at 70-90 kVp; scatter from the field still "
        "reaches the detector behind the blades",
        log=True,
    )
    shutter_penumbra_mm: Range = _ext((0.5, 3.0), "blade penumbra at the isocentre", "mm")
    blank_p: float = _ext(0.5, "vendors blank the area outside the shutter in stored pixels")
    text_p: float = _ext(
        0.6,
        "exports and secondary captures burn in patient details, dates, angles, frame counters",
    )
    marker_p: float = _ext(0.5, "burned-in L/R markers and rulers")


@dataclass(frozen=True)
class DSAPriors(XAPriors):
    """Cerebral DSA: the common XA priors plus view, bolus timing, devices, motion, anatomy."""

    primary_jitter_deg: float = _geo(
        25.0, "working projections are oblique to separate vessels", "deg (max)"
    )
    secondary_jitter_deg: float = _geo(20.0, "cranial and caudal tilt", "deg (max)")
    flip_p: float = _geo(0.3, "lateral views are displayed facing left or right")
    bolus_arrival_s: Range = _con(
        (0.3, 2.5), "X-ray delay versus injector delay: runs start before or at arrival", "s"
    )
    bolus_rise_s: Range = _con((0.6, 2.5), "hand versus power injection, cardiac output", "s")
    bolus_alpha: Range = _con((1.5, 6.0), "gamma-variate shape: sharp to broad boluses")
    recirculation: Range = _con((0.02, 0.2), "second pass after 8-12 s")
    venous_delay_s: Range = _con(
        (2.0, 7.5),
        "cerebral circulation time is 3-6 s; shorter with shunts and hyperaemia (early "
        "veins), longer with raised pressure or vasospasm, so arterial and venous phases "
        "overlap in many runs",
        "s",
    )
    microcatheter_p: float = _ext(
        0.3, "selective and interventional runs: a 1.7-2.4F microcatheter with marker bands"
    )
    misregistration_p: float = _ext(
        0.5,
        "patients swallow, breathe and move when the contrast is felt: misregistration of "
        "the mask is the commonest DSA artefact",
    )
    misregistration_mm: Range = _ext((0.2, 2.5), "shift of the mask against the live frames", "mm")
    misregistration_deg: Range = _ext((0.0, 0.8), "rotation of the mask", "deg")
    bone_scale: Range = _ext((0.7, 1.3), "skull thickness and density (seen in native runs)")
    anatomy: AnatomyPriors = field(default_factory=AnatomyPriors)


@dataclass(frozen=True)
class CoronaryPriors(XAPriors):
    """Coronary cine: the common XA priors with cardiac ranges, plus heart, tree and devices."""

    matrix: Range = _geo((512, 1024), "cardiac cine is mostly 512^2, newer systems 1024^2", "px")
    square_p: float = _geo(0.8, "share of square matrices")
    detector_field_mm: Range = _geo((150.0, 250.0), "cardiac panels of 20-25 cm and zooms", "mm")
    magnification: Range = _geo((1.2, 1.6), "heart near the isocentre")
    centre_shift_mm: float = _geo(15.0, "operators pan to the vessel of interest", "mm (max)")
    calibre_scale: Range = _geo(
        (0.75, 1.3), "LM 3-5.5 mm, proximal LAD 2.5-4 mm: body size, sex, diffuse disease"
    )
    wiggle: Range = _geo((0.01, 0.06), "coronary tortuosity (age, hypertension)")
    branch_scale: Range = _geo((0.5, 1.7), "number of diagonals, septals and marginals")
    stenosis_count_p: tuple[float, ...] = _geo(
        (0.4, 0.35, 0.25), "P(0, 1, 2 stenoses) in patients referred for angiography"
    )
    stenosis_severity: Range = _geo((0.3, 0.9), "diameter reduction")
    stenosis_length_mm: Range = _geo((3.0, 15.0), "focal to diffuse lesions", "mm")
    torso_scale: Range = _geo((0.85, 1.3), "slim to obese chests: more scatter and noise")
    diaphragm_shift_mm: Range = _geo(
        (-30.0, 20.0), "breath-hold level: the liver enters the field", "mm"
    )
    iodine_mg_ml: Range = _con((270.0, 370.0), "full-strength contrast for coronaries", "mgI/mL")
    injection_s: Range = _con((1.0, 4.0), "hand injections of 4-10 mL over 1.5-3 s", "s")
    bolus_peak: Range = _con(
        (0.35, 0.95), "an engaged catheter fills the artery almost fully, a loose one less"
    )
    fill_speed_mm_s: Range = _con((100.0, 300.0), "contrast front speed of 10-30 cm/s", "mm/s")
    washout_s: Range = _con((0.3, 1.2), "washout time constant after the injection", "s")
    partial_filling_p: float = _con(0.3, "streaming and competitive flow in side branches")
    fps_fast: tuple[float, ...] = _acq(
        (7.5, 10.0, 12.5, 15.0, 15.0, 25.0, 30.0), "cine programs run 7.5-30 fps", "fps"
    )
    constant_rate_p: float = _acq(1.0, "cine keeps one rate (jitter and drops still apply)")
    frame_jitter: Range = _acq((0.0, 0.03), "pulse timing jitter", "relative SD")
    frame_drop_p: float = _acq(0.1, "runs with a dropped frame")
    snr: Range = _acq(
        (4.0, 25.0),
        "cine dose of 0.1-0.3 uGy per frame: a 1 mm vessel's contrast over noise is low",
        log=True,
    )
    scatter_ratio: Range = _acq((0.3, 1.4), "scatter-to-primary of 0.5-1.5 in the chest")
    range_compression: Range = _acq((0.3, 0.85), "vendor range compression (lungs and spine)")
    edge_enhancement: Range = _acq((0.0, 1.0), "vendor unsharp masking of cine images")
    heart_rate_bpm: Range = _acq((45.0, 120.0), "bradycardia to tachycardia", "bpm")
    rr_variability: Range = _acq((0.0, 0.15), "sinus arrhythmia to atrial fibrillation", "CV")
    breathing_mm: Range = _acq((0.0, 15.0), "failed breath-holds move the heart", "mm")
    pan_mm: Range = _acq((0.0, 25.0), "table panning during the cine", "mm")
    catheter_radius_mm: Range = _ext((0.8, 1.35), "5-8F guiding catheters", "mm")
    guidewire_p: float = _ext(0.3, "PCI runs: a 0.014 inch wire in the artery")
    sternal_wire_p: float = _ext(0.15, "after sternotomy (bypass or valve surgery)")
    ecg_p: float = _ext(0.5, "ECG electrodes and leads on the chest")
    clip_p: float = _ext(0.1, "surgical clips from bypass grafting")


@dataclass(frozen=True)
class RotationalPriors:
    """3D rotational angiography (cone-beam CT) reconstruction priors."""

    field_mm: Range = _vol(
        (80.0, 200.0),
        "3D-RA reconstructions cover 80-250 mm at 0.1-0.5 mm voxels; the caller's size "
        "sets the matrix",
        "mm",
    )
    centre_shift_mm: float = _vol(12.0, "the volume is centred on the lesion", "mm (max)")
    contrast_hu: Range = _vol(
        (200.0, 3000.0),
        "intra-arterial injection fills arteries at 200-3000 HU: diluted runs look like "
        "CTA, full-strength iodine is brighter than cortical bone",
        "HU",
        log=True,
    )
    distal_dilution: Range = _vol((0.0, 0.5), "contrast falls along the tree (mixing)")
    bone_scale: Range = _vol(
        (0.6, 1.4),
        "bone density falls with age; cone-beam values are not calibrated across vendors",
    )
    streak_scale: Range = _vol(
        (0.5, 3.0), "beam hardening and photon starvation by metal and dense bone", log=True
    )
    noise_hu: Range = _vol(
        (5.0, 80.0),
        "low-dose (5 s, 133 views) to high-dose (20 s, 496 views) rotations",
        "HU",
        log=True,
    )
    kernel_sigma_vox: Range = _vol((0.3, 1.2), "sharp to smooth reconstruction kernels", "voxels")
    sharpening: Range = _vol((0.0, 0.8), "edge-enhancing kernels overshoot at edges")
    noise_grain_vox: Range = _vol((0.5, 1.5), "noise correlation length", "voxels")
    truncation: Range = _vol(
        (0.75, 1.0),
        "radius of the reconstruction circle (fraction of the half matrix): the head often "
        "exceeds the 15-25 cm detector",
    )
    capping_hu: Range = _vol(
        (0.0, 400.0), "truncated projections raise values near the field edge", "HU"
    )
    bits: tuple[int, ...] = _vol((12, 16), "12 bits (HU + 1024, clipped at 3071) or 16 bits")
    skull_base_porosity: Range = _vol(
        (0.0, 0.8),
        "the petrous bone, mastoid and clivus are cancellous or pneumatised: thin septa "
        "around marrow or air cells (0 draws them solid)",
    )
    skull_base_cell_mm: Range = _vol(
        (1.0, 5.0), "marrow spaces of 1-2 mm to mastoid air cells of several mm", "mm"
    )
    skull_base_cell_hu: Range = _vol(
        (-1000.0, 60.0), "air cells (pneumatised) to fatty or red marrow", "HU"
    )
    anatomy: AnatomyPriors = field(default_factory=AnatomyPriors)


DSA = DSAPriors()
CORONARY = CoronaryPriors()
ROTATIONAL = RotationalPriors()


def resolve(randomise: Any, default: Any) -> Any:
    """``False``/None -> None (default appearance), ``True`` -> ``default``, an instance -> itself."""
    if randomise is False or randomise is None:
        return None
    if randomise is True:
        return default
    if type(randomise) is not type(default):
        raise PhantomOptionError(
            f"randomise must be a bool or a {type(default).__name__}, "
            f"got {type(randomise).__name__}"
        )
    return randomise


def uniform(rng: np.random.Generator, bounds: Range, log: bool = False) -> float:
    """One draw within ``bounds`` (log-uniform if asked); always consumes exactly one value."""
    lo, hi = (float(v) for v in bounds)
    u = float(rng.random())
    if lo == hi:
        return lo
    if log and lo > 0:
        return float(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
    return lo + u * (hi - lo)


def count(rng: np.random.Generator, probabilities: tuple[float, ...]) -> int:
    """Index drawn with the given (unnormalised) probabilities."""
    p = np.asarray(probabilities, float)
    return int(rng.choice(len(p), p=p / p.sum()))


def draw_matrix(rng: np.random.Generator, pri: XAPriors) -> tuple[int, int]:
    """(rows, columns): multiples of 16 within the prior, square with ``square_p``."""
    lo, hi = float(pri.matrix[0]), float(pri.matrix[1])
    rows = int(16 * round(rng.uniform(lo, hi) / 16))
    cols = rows if rng.random() < pri.square_p else int(16 * round(rng.uniform(lo, hi) / 16))
    return rows, cols


# --- the docs tables ---------------------------------------------------------------------------


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fmt(value: Any) -> str:
    if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
        return ", ".join(v.lower() for v in value)
    if isinstance(value, tuple) and len(value) == 2:
        return f"{_num(value[0])}-{_num(value[1])}"
    if isinstance(value, tuple):
        return ", ".join(_num(v) for v in value)
    if isinstance(value, float) and value <= 1.0 and not value.is_integer():
        return f"p = {value:g}"
    return _num(value)


def markdown_table(priors: Any) -> str:
    """One row per prior: group, name, range, unit and why (nested anatomy priors left out)."""
    rows = []
    for f in dataclasses.fields(priors):
        value = getattr(priors, f.name)
        if dataclasses.is_dataclass(value):
            continue
        log = " (log-uniform)" if f.metadata.get("log") else ""
        rows.append(
            (
                GROUPS.index(f.metadata["group"]),
                f"| {f.metadata['group']} | `{f.name}` | {_fmt(value)}{log} | "
                f"{f.metadata['unit']} | {f.metadata['why']} |",
            )
        )
    head = [
        "| group | parameter | range | unit | why real runs vary that much |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + [line for _, line in sorted(rows, key=lambda r: r[0])])


def tables() -> str:
    """The four tables of docs/phantoms.md, with headings."""
    parts = [
        ("Cerebral anatomy (`dsa` and `rotational`)", AnatomyPriors()),
        ("Cerebral DSA (`dsa`)", DSA),
        ("Coronary cine (`coronary`)", CORONARY),
        ("3D rotational angiography (`rotational`)", ROTATIONAL),
    ]
    return "\n\n".join(f"#### {title}\n\n{markdown_table(p)}" for title, p in parts)


if __name__ == "__main__":
    print(tables())
