"""Pictures for ``bench.generalization --pictures``: each pipeline's output, classical and
packaged side by side, so a reader can judge it by eye.

- ``xa_coronary_real.png``: the real coronary cine in ``/work/shared/data/real``
  (XA_RuboDEMO_96f_512_JPEGBaseline.dcm, read from there, decoded by the node's
  own ``dicom_node.runs.load_run``), three frames;
- ``<pipeline>_family_b.png``: one family B run per pipeline with its truth,
  because no real cerebral DSA or 3D rotational file is available here.

Every panel carries its label; overlays are drawn over the run's MinIP or frame.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from bench.generalization import B_SEED0, ROOT, Method, methods_for
from pipelines.base import PipelineError
from pipelines.perfusion.localise import rule_in

IMG = ROOT / "docs" / "img" / "generalization"
REAL = Path(os.environ.get("ANGIO_REAL_DATA", "/work/shared/data/real"))
CINE = "XA_RuboDEMO_96f_512_JPEGBaseline.dcm"
RED, BLUE, MAGENTA, YELLOW = (255, 40, 40), (40, 110, 255), (220, 0, 220), (255, 220, 0)


def _grey(
    image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5, region: np.ndarray | None = None
) -> np.ndarray:
    """Window by percentiles, taken inside ``region`` (the open collimator field) when
    given, so a shutter burned to white or black does not set the window."""
    values = image[region] if region is not None and region.any() else image
    lo, hi = np.percentile(values, [lo_pct, hi_pct])
    g = (np.clip((image - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def _overlay(rgb: np.ndarray, masks: list[np.ndarray], colours: list[tuple]) -> np.ndarray:
    out = rgb.astype(np.float32)
    for m, c in zip(masks, colours, strict=True):
        out[m] = 0.35 * out[m] + 0.65 * np.asarray(c, np.float32)
    return out.astype(np.uint8)


# The label above each panel: up to two lines of the default font (6 px a character),
# so that an option's label ("classical, drift_correction=true: ...") fits a quick panel.
LABEL_LINES = 2
LINE_PX = 12


def _panel(rgb: np.ndarray, label: str, side: int) -> Image.Image:
    img = Image.fromarray(rgb)
    scale = side / max(img.size)
    img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
    top = 2 + LABEL_LINES * LINE_PX
    canvas = Image.new("RGB", (side, side + top), (0, 0, 0))
    canvas.paste(img, ((side - img.width) // 2, top + (side - img.height) // 2))
    lines = textwrap.wrap(label, width=max(8, side // 6 - 1), max_lines=LABEL_LINES)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((2, 1 + i * LINE_PX), line, fill=(255, 255, 255), font=ImageFont.load_default())
    return canvas


def _grid(rows: list[list[Image.Image]], path: Path) -> Path:
    w = max(sum(p.width for p in r) for r in rows)
    h = sum(max(p.height for p in r) for r in rows)
    out = Image.new("RGB", (w, h))
    y = 0
    for r in rows:
        x = 0
        for p in r:
            out.paste(p, (x, y))
            x += p.width
        y += max(p.height for p in r)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An adaptive 256-colour palette keeps the grey ramp and the overlay colours and
    # halves the file.
    out.convert("P", palette=Image.ADAPTIVE, colors=256).save(path, optimize=True)
    return path


def _run(pipeline: str, run: Any, method: Method) -> Any:
    import pipelines

    try:
        return pipelines.get(pipeline)(run, method.context())
    except PipelineError as exc:
        return exc


def _seg(result: Any, key: str) -> dict[str, np.ndarray]:
    from bench.generalization import _segments

    return _segments(result, key)


def coronary_real(extra: dict[str, list[str]], side: int, out: Path) -> Path | None:
    from dicom_node.runs import load_run

    path = REAL / CINE
    if not path.is_file():
        return None
    run = load_run([path]).run
    t = run.pixels.shape[0]
    frames = [int(t * f) for f in (0.25, 0.5, 0.75)]
    rows = [[_panel(_grey(run.pixels[k]), f"real cine frame {k + 1}/{t}", side) for k in frames]]
    for method in methods_for("xa_coronary", extra):
        result = _run("xa_coronary", run, method)
        if isinstance(result, Exception):
            rows.append(
                [_panel(_grey(run.pixels[k]), f"{method.label}: refused", side) for k in frames]
            )
            continue
        masks = next(iter(_seg(result, "vessels").values()))
        rows.append(
            [
                _panel(_overlay(_grey(run.pixels[k]), [masks[k]], [RED]), method.label, side)
                for k in frames
            ]
        )
    return _grid(rows, out / "xa_coronary_real.png")


SEEDS = (B_SEED0, B_SEED0 + 1)  # the first two family B runs of the bench, not chosen


def dsa_figures(extra: dict[str, list[str]], side: int, quick: bool, out: Path) -> list[Path]:
    from pipelines.base import ParametricMapOutput, minip
    from training.phantoms.family_b import dsa

    av_rows, ia_rows, perf_rows = [], [], []
    vmax = 6.0
    for seed in SEEDS:
        p = dsa.generate(seed, size=96 if quick else 256, duration_s=14 if quick else 20)
        run = p.to_run()
        truth = p.truth
        base = _grey(minip(run.pixels), region=truth["field"])
        tag = f"B {seed} {p.acquisition.view}"
        # dsa_av: arteries red, veins blue, both magenta.
        row = [
            _panel(base, f"{tag}: MinIP", side),
            _panel(
                _overlay(base, _av_layers(truth["artery"], truth["vein"]), [RED, BLUE, MAGENTA]),
                "truth (artery red, vein blue)",
                side,
            ),
        ]
        for method in methods_for("dsa_av", extra):
            result = _run("dsa_av", run, method)
            if isinstance(result, Exception):
                row.append(_panel(base, f"{method.label}: refused", side))
                continue
            seg = _seg(result, "av")
            layers = _av_layers(seg["Artery"], seg["Vein"])
            row.append(_panel(_overlay(base, layers, [RED, BLUE, MAGENTA]), method.label, side))
        av_rows.append(row)
        # dsa_ia: arteries only.
        row = [_panel(_overlay(base, [truth["artery"]], [RED]), f"{tag}: truth arteries", side)]
        for method in methods_for("dsa_ia", extra):
            result = _run("dsa_ia", run, method)
            if isinstance(result, Exception):
                row.append(_panel(base, f"{method.label}: refused", side))
                continue
            artery = _seg(result, "ia")["Artery"]
            row.append(_panel(_overlay(base, [artery], [RED]), method.label, side))
        ia_rows.append(row)
        # dsa_perfusion: Tmax maps and where each method measured its AIF.
        row = [
            _panel(
                _tmax_rgb(truth["tmax"], np.isfinite(truth["tmax"]), vmax),
                f"{tag}: truth Tmax (0-6 s)",
                side,
            ),
            _panel(_overlay(base, [truth["ica"]], [YELLOW]), "truth ICA", side),
        ]
        for method in methods_for("dsa_perfusion", extra):
            result = _run("dsa_perfusion", run, method)
            if isinstance(result, Exception):
                row.append(_panel(base, f"{method.label}: refused", side))
                continue
            maps = {o.key: o for o in result.outputs if isinstance(o, ParametricMapOutput)}
            tmax = maps["tmax"]
            valid = tmax.valid if tmax.valid is not None else np.ones(tmax.values.shape, bool)
            row.append(_panel(_tmax_rgb(tmax.values, valid, vmax), f"{method.label}: Tmax", side))
            # Where the AIF was measured, from whichever rule served (the result's
            # AIF region; widened by a pixel so that a small one shows).
            (aif,) = _seg(result, "aif_region").values()
            shown = ndimage.binary_dilation(aif.astype(bool))
            key = rule_in(result.notes)
            which = f"{key} rule" if key else "rule not named"
            label = f"{method.label}: AIF ({which})"
            row.append(_panel(_overlay(base, [shown], [YELLOW]), label, side))
        perf_rows.append(row)
    return [
        _grid(av_rows, out / "dsa_av_family_b.png"),
        _grid(ia_rows, out / "dsa_ia_family_b.png"),
        _grid(perf_rows, out / "dsa_perfusion_family_b.png"),
    ]


def _av_layers(artery: np.ndarray, vein: np.ndarray) -> list[np.ndarray]:
    a, v = artery.astype(bool), vein.astype(bool)
    return [a & ~v, v & ~a, a & v]


def _tmax_rgb(values: np.ndarray, valid: np.ndarray, vmax: float) -> np.ndarray:
    from pipelines.render import _lut

    lut = _lut("perfusion")
    idx = np.clip(np.nan_to_num(values / vmax) * 255, 0, 255).astype(np.uint8)
    rgb = lut[idx]
    rgb[~(valid & np.isfinite(values))] = 60  # grey where there is no value
    return rgb


def coronary_b(extra: dict[str, list[str]], side: int, quick: bool, out: Path) -> Path:
    from training.phantoms.family_b import coronary

    rows = []
    for seed in SEEDS:
        p = coronary.generate(seed, size=96 if quick else 256, frames=24 if quick else None)
        run = p.to_run()
        k = int(np.argmax(p.truth["vessel"].sum(axis=(1, 2))))
        base = _grey(run.pixels[k], region=p.truth["field"])
        t = run.pixels.shape[0]
        row = [
            _panel(base, f"B {seed}: frame {k + 1}/{t}", side),
            _panel(_overlay(base, [p.truth["vessel"][k]], [RED]), "truth", side),
        ]
        for method in methods_for("xa_coronary", extra):
            result = _run("xa_coronary", run, method)
            if isinstance(result, Exception):
                row.append(_panel(base, f"{method.label}: refused", side))
                continue
            masks = next(iter(_seg(result, "vessels").values()))
            row.append(_panel(_overlay(base, [masks[k]], [RED]), method.label, side))
        rows.append(row)
    return _grid(rows, out / "xa_coronary_family_b.png")


def rotational_b(extra: dict[str, list[str]], side: int, quick: bool, out: Path) -> Path:
    from training.phantoms.family_b import rotational

    rows = []
    for level in (300, 3000) if quick else (300, 1000, 3000):
        p = rotational.generate(
            B_SEED0 + level, size=48 if quick else 256, contrast_hu=float(level)
        )
        run = p.to_run()
        hu_mip = run.pixels.max(axis=1)[::-1]
        base = _grey(hu_mip, 1.0, 99.9)
        row = [
            _panel(base, f"family B {level} HU: MIP (coronal)", side),
            _panel(_mask_mip(p.truth["labels"] == 1), "truth vessels (MIP)", side),
        ]
        for method in methods_for("rotational_dla", extra):
            result = _run("rotational_dla", run, method)
            if isinstance(result, Exception):
                row.append(_panel(base, f"{method.label}: refused", side))
                continue
            vessel = _seg(result, "tissues")["Blood vessel"]
            row.append(_panel(_mask_mip(vessel, p.truth["labels"] == 1), method.label, side))
        rows.append(row)
    return _grid(rows, out / "rotational_dla_family_b.png")


def _mask_mip(mask: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """Coronal MIP of a vessel mask; with ``truth``: true positives white, false
    positives red, missed vessel blue."""
    m = mask.any(axis=1)[::-1]
    if truth is None:
        return np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=-1)
    t = truth.any(axis=1)[::-1]
    rgb = np.zeros((*m.shape, 3), np.uint8)
    rgb[m & t] = (255, 255, 255)
    rgb[m & ~t] = RED
    rgb[~m & t] = BLUE
    return rgb


def write_pictures(extra: dict[str, list[str]], quick: bool = False, out: Path = IMG) -> list[Path]:
    side = 160 if quick else 240
    written = []
    real = coronary_real(extra, side, out)
    if real is not None:
        written.append(real)
    written += dsa_figures(extra, side, quick, out)
    written.append(coronary_b(extra, side, quick, out))
    written.append(rotational_b(extra, side, quick, out))
    return written
