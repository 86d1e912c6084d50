"""``python -m training scribbles``: scribble annotations as DICOM SEG on the node's canvas.

A scribble annotation marks only the pixels an annotator drew on: strokes on
vessels (artery, vein, ICA, vessel ...) and strokes on background; every other
pixel is unknown (``training.annotations``: a SEG with a Background segment,
DCM 125040, is read as scribbles). The SEG references the run's MinIP canvas,
the Secondary Capture the node writes for the run: its UIDs depend only on the
run's SOP instances (``dicom_node.encode.canvas``), so the canvas written here is
the node's, and the SEG resolves to the run whether the node's canvas or this
one is in the archive.

Two ways in:

- ``--labels FILE --map 1=artery,2=vein,3=background``: a label image drawn on
  the canvas (rows x columns of the run), integer labels, 0 = not drawn. PNG (or
  any single-channel image Pillow reads), NumPy ``.npy``/``.npz``, or NIfTI
  ``.nii``/``.nii.gz`` (read with nibabel when it is installed; NIfTI's first
  axis is the column: the array is transposed, ``--no-transpose`` keeps it).
- ``--from-seg FULL_SEG``: scribbles sampled from a full annotation on the
  canvas, for experiments (how much do scribbles lose against full labels?):
  pieces of each vessel's centre line (``--fraction`` of it, ``--width`` px
  wide) and background lines away from every vessel, seeded (``--seed``).

Writes ``canvas.dcm`` (unless ``--canvas`` names the canvas to use),
``scribbles_seg.dcm`` and ``scribbles_preview.png`` (the strokes over the
canvas, to check the orientation) into ``--out``; upload both DICOM files with
the run's study (``storescu ... +sd +sp '*.dcm' -R``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from training.annotations import (
    FOREGROUND_ROLES,
    ROLES,
    _frame_sources,
    segment_pixels,
    segment_roles,
)

SCRIBBLE_ROLES = (*FOREGROUND_ROLES, "background")
PROPERTY = {role: code for code, role in ROLES.items()}
DESCRIPTION = "Scribble annotation"


class ScribbleError(Exception):
    """Input the scribble tool cannot use, with the reason."""


def _code(role: str) -> hd.sr.CodedConcept:
    value, scheme = PROPERTY[role]
    meanings = {
        "artery": "Artery",
        "vein": "Vein",
        "ica": "Internal carotid artery",
        "vessel": "Blood vessel",
        "bone": "Bone",
        "soft_tissue": "Soft tissue",
        "background": "Background",
    }
    return hd.sr.CodedConcept(value, scheme, meanings[role])


def parse_map(text: str) -> dict[int, str]:
    """``1=artery,2=vein,3=background`` -> {1: "artery", ...}."""
    out: dict[int, str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        value, _, role = item.partition("=")
        try:
            label = int(value)
        except ValueError:
            raise ScribbleError(f"--map: {item!r} is not LABEL=ROLE") from None
        if role not in SCRIBBLE_ROLES or label <= 0:
            raise ScribbleError(
                f"--map: {item!r}: labels are positive integers, roles one of "
                f"{', '.join(SCRIBBLE_ROLES)}"
            )
        out[label] = role
    if "background" not in out.values():
        raise ScribbleError(
            "--map: no label is mapped to background; a scribble annotation needs background "
            "strokes (without them every unmarked pixel would count as unknown and nothing "
            "as background)"
        )
    return out


def read_labels(path: Path, transpose: bool = True) -> np.ndarray:
    """An integer (rows, columns) label image from PNG/NumPy/NIfTI."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        try:
            import nibabel
        except ImportError:
            raise ScribbleError(
                f"{path}: NIfTI needs the package nibabel (pip install nibabel); or save the "
                "labels as PNG or .npy"
            ) from None
        arr = np.squeeze(np.asarray(nibabel.load(str(path)).dataobj))
        arr = arr.T if transpose and arr.ndim == 2 else arr
    elif name.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    elif name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if len(z.files) != 1:
                raise ScribbleError(f"{path}: holds {z.files}; give an .npz with one array")
            arr = z[z.files[0]]
    else:
        from PIL import Image

        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise ScribbleError(
                    f"{path}: a {img.mode} image; give a single-channel label image "
                    "(integer labels, 0 = not drawn)"
                )
            arr = np.asarray(img)
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ScribbleError(f"{path}: labels of shape {arr.shape}; expected one 2D image")
    if not np.allclose(arr, np.round(arr)):
        raise ScribbleError(f"{path}: labels are not integers")
    return arr.astype(np.int64)


def masks_from_labels(labels: np.ndarray, mapping: Mapping[int, str]) -> dict[str, np.ndarray]:
    unknown = sorted(set(np.unique(labels).tolist()) - {0} - set(mapping))
    if unknown:
        raise ScribbleError(f"labels {unknown} are in the image but not in --map")
    out: dict[str, np.ndarray] = {}
    for label, role in mapping.items():
        out[role] = out.get(role, np.zeros(labels.shape, bool)) | (labels == label)
    return {r: m for r, m in out.items() if m.any()}


def full_masks(seg: Dataset) -> dict[str, np.ndarray]:
    """Role -> (rows, columns) mask of a full annotation drawn on one image (the canvas)."""
    roles = segment_roles(seg)
    if "background" in roles.values():
        raise ScribbleError("--from-seg: this SEG is already a scribble annotation")
    pixels = segment_pixels(seg)
    sources = _frame_sources(seg)
    numbers = [n for n, _, _ in sources] if len(sources) == len(pixels) else sorted(roles)
    out: dict[str, np.ndarray] = {}
    for number, frame in zip(numbers, pixels, strict=True):
        role = roles.get(number)
        if role is not None:
            out[role] = out.get(role, np.zeros(frame.shape, bool)) | frame
    if not out:
        raise ScribbleError("--from-seg: no segment with a known property type")
    return out


def sample(
    full: Mapping[str, np.ndarray], fraction: float, width: int, seed: int
) -> dict[str, np.ndarray]:
    """Scribbles from full masks: random pieces of each role's centre line covering
    ``fraction`` of it, and as many background pixels on random lines at least
    3 px away from every foreground pixel."""
    from skimage.draw import line
    from skimage.morphology import skeletonize

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    radius = max(0, (width - 1) // 2)
    grow = np.ones((2 * radius + 1,) * 2, bool)
    for role in sorted(full):
        mask = np.asarray(full[role], bool)
        if not mask.any():
            continue
        skeleton = skeletonize(mask)
        # Branches: the skeleton without its junctions, as 8-connected pieces.
        neighbours = ndimage.convolve(skeleton.astype(int), np.ones((3, 3), int), mode="constant")
        branches, count = ndimage.label(skeleton & (neighbours <= 3), structure=np.ones((3, 3)))
        sizes = np.bincount(branches.ravel())[1:]
        chosen = np.zeros_like(mask)
        target, taken = fraction * skeleton.sum(), 0
        for index in rng.permutation(count):
            if taken >= target:
                break
            chosen |= branches == index + 1
            taken += int(sizes[index])
        out[role] = ndimage.binary_dilation(chosen, grow) & mask if radius else chosen
    foreground = np.logical_or.reduce([np.asarray(m, bool) for m in full.values()])
    allowed = ~ndimage.binary_dilation(foreground, iterations=3)
    wanted = sum(int(m.sum()) for m in out.values())
    background = np.zeros_like(foreground)
    h, w = foreground.shape
    for _ in range(200):
        if int(background.sum()) >= wanted:
            break
        r0, c0 = int(rng.integers(h)), int(rng.integers(w))
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * min(h, w)
        r1 = int(np.clip(r0 + length * np.sin(angle), 0, h - 1))
        c1 = int(np.clip(c0 + length * np.cos(angle), 0, w - 1))
        rr, cc = line(r0, c0, r1, c1)
        stroke = np.zeros_like(background)
        stroke[rr, cc] = True
        background |= stroke & allowed
    out["background"] = background
    return {r: m for r, m in out.items() if m.any()}


def canvas_for(run_paths: Sequence[Path]) -> tuple[Dataset, Any]:
    """The node's MinIP canvas of a run (same UIDs as the node's), and the run."""
    from dicom_node.encode.canvas import make_canvas
    from dicom_node.encode.common import EncodeContext
    from dicom_node.runs import load_run
    from pipelines.base import minip

    loaded = load_run(list(run_paths))
    if loaded.run.meta.is_volume:
        raise ScribbleError("a volume: scribbles go on the MinIP canvas of a 2D run")
    ctx = EncodeContext(sources=loaded.headers, pipeline="training.scribbles")
    return make_canvas(ctx, minip(loaded.run.pixels)), loaded.run


def write_seg(
    canvas: Dataset, masks: Mapping[str, np.ndarray], sampled_from: str | None
) -> hd.seg.Segmentation:
    """A BINARY SEG of the strokes on the canvas, one segment per role."""
    roles = [r for r in SCRIBBLE_ROLES if r in masks]
    if sampled_from is None:
        kind = hd.seg.SegmentAlgorithmTypeValues.MANUAL
        algorithm = None
    else:
        kind = hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
        algorithm = hd.AlgorithmIdentificationSequence(
            name="training.scribbles sampling",
            family=codes.cid7162.MorphologicalOperations,
            version="1",
        )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=f"{role} strokes",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=_code(role),
            algorithm_type=kind,
            algorithm_identification=algorithm,
        )
        for i, role in enumerate(roles)
    ]
    seg = hd.seg.Segmentation(
        source_images=[canvas],
        pixel_array=np.stack([masks[r] for r in roles], axis=-1)[None].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=60,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="angio-dicom-node",
        manufacturer_model_name="training.scribbles",
        software_versions="1",
        device_serial_number="0",
        omit_empty_frames=False,
        series_description=(
            DESCRIPTION if sampled_from is None else f"{DESCRIPTION} (sampled from a full SEG)"
        )[:64],
    )
    return seg


def preview(path: Path, canvas: Dataset, masks: Mapping[str, np.ndarray]) -> Path:
    from PIL import Image

    from pipelines.render import overlay, to_grey_rgb

    image = canvas.pixel_array.astype(np.float32).reshape(masks_shape(masks))
    zoom = max(1, 512 // max(image.shape))  # small images enlarged to be legible

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, zoom, axis=0), zoom, axis=1)

    colours = {"artery": (255, 40, 40), "vein": (40, 110, 255), "background": (0, 200, 0)}
    roles = sorted(masks)
    rgb = overlay(
        to_grey_rgb(up(image)),
        [up(np.asarray(masks[r], bool)) for r in roles],
        [colours.get(r, (255, 200, 0)) for r in roles],
    )
    Image.fromarray(rgb).save(path)
    return path


def masks_shape(masks: Mapping[str, np.ndarray]) -> tuple[int, int]:
    return tuple(next(iter(masks.values())).shape)  # type: ignore[return-value]


def run_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(p) for p in args.run]
    if args.canvas:
        canvas = pydicom.dcmread(args.canvas)
    else:
        canvas, _ = canvas_for(runs)
        canvas.save_as(out / "canvas.dcm", enforce_file_format=True)
    shape = (int(canvas.Rows), int(canvas.Columns))
    if args.from_seg:
        seg_in = pydicom.dcmread(args.from_seg)
        refs = {
            str(i.ReferencedSOPInstanceUID)
            for s in seg_in.get("ReferencedSeriesSequence", [])
            for i in s.get("ReferencedInstanceSequence", [])
        }
        if refs and str(canvas.SOPInstanceUID) not in refs:
            raise ScribbleError(
                f"--from-seg {args.from_seg} does not reference the canvas "
                f"{canvas.SOPInstanceUID} of this run"
            )
        masks = sample(full_masks(seg_in), args.fraction, args.width, args.seed)
    else:
        if not args.labels or not args.map:
            raise ScribbleError("give --labels FILE with --map, or --from-seg FULL_SEG")
        labels = read_labels(Path(args.labels), transpose=not args.no_transpose)
        masks = masks_from_labels(labels, parse_map(args.map))
    if not masks:
        raise ScribbleError("no strokes: every label image pixel is 0 (not drawn)")
    if masks_shape(masks) != shape:
        raise ScribbleError(
            f"labels of shape {masks_shape(masks)} do not fit the canvas {shape} (rows, columns)"
        )
    if "background" not in masks or len(masks) < 2:
        raise ScribbleError(
            f"strokes of {sorted(masks)}: a scribble annotation needs background strokes "
            "and at least one foreground role"
        )
    seg = write_seg(canvas, masks, args.from_seg)
    seg.save_as(out / "scribbles_seg.dcm")
    preview(out / "scribbles_preview.png", canvas, masks)
    counts = ", ".join(f"{r} {int(m.sum())} px" for r, m in sorted(masks.items()))
    print(f"scribbles on canvas {canvas.SOPInstanceUID}: {counts}")
    print(f"wrote {out / 'scribbles_seg.dcm'}" + ("" if args.canvas else " and canvas.dcm"))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", nargs="+", required=True, help="the run's DICOM file(s)")
    p.add_argument("--canvas", help="the run's canvas SC (default: make the node's canvas)")
    p.add_argument("--labels", help="label image: PNG, .npy/.npz or NIfTI (0 = not drawn)")
    p.add_argument("--map", help="label to role, e.g. 1=artery,2=vein,3=background")
    p.add_argument(
        "--no-transpose", action="store_true", help="NIfTI stored row-first (not x = column)"
    )
    p.add_argument("--from-seg", help="sample scribbles from this full SEG on the canvas")
    p.add_argument("--fraction", type=float, default=0.2, help="share of each centre line kept")
    p.add_argument("--width", type=int, default=1, help="stroke width in pixels (odd)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training scribbles", description=__doc__)
    add_arguments(p)
    try:
        return run_command(p.parse_args(argv))
    except ScribbleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
