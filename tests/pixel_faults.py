"""A generated corpus of runs and volumes whose pixels a pipeline cannot expect, for
tests/test_series_faults.py.

The headers are valid and ingest stores every case; what is unusual is the image
itself: its size (one pixel, one row, two frames, thousands of tiny frames), its
encoding (8, 12, 16 or 32 bits, signed, a high bit set beyond Bits Stored,
MONOCHROME1, RGB and YBR in either planar configuration, a palette without its
table), its content (all zero, saturated, constant, one hot pixel, a checkerboard,
noise, identical frames, a ramp) and its rescale (a slope of zero, negative, 1e30,
1e38, 1e300 or NaN; an intercept of 1e300). Every case starts from a small phantom
run (or the CT series of a small rotational phantom) and changes one of these, or,
in the random cases, several at once. The corpus is deterministic for a seed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.series_faults import Case

DTYPES = {
    (8, 0): np.uint8,
    (16, 0): np.uint16,
    (16, 1): np.int16,
    (32, 0): np.uint32,
    (32, 1): np.int32,
}


def frames_case(
    name: str,
    source: Dataset,
    pixels: np.ndarray,
    bits: int = 16,
    stored: int | None = None,
    signed: int = 0,
    **attributes: Any,
) -> Case:
    """``source`` (a multi-frame XA run) holding ``pixels`` (T, H, W), uncompressed."""
    ds = copy.deepcopy(source)
    frames, rows, cols = pixels.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.FrameTimeVector = [0.0] + [250.0] * (frames - 1)
    ds.BitsAllocated, ds.PixelRepresentation = bits, signed
    ds.BitsStored = stored or (8 if bits == 8 else 12)
    ds.HighBit = ds.BitsStored - 1
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    data = pixels.astype(DTYPES[bits, signed]).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return Case(name, [ds])


def colour_case(name: str, source: Dataset, planar: int, photometric: str = "RGB") -> Case:
    """``source`` as 8-bit colour: R, G, B are increasing linear maps of its grey value
    (B decreasing), so the luminance is one too."""
    ds = copy.deepcopy(source)
    grey = (source.pixel_array >> 4).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, 255 - grey], -1)
    if planar:
        rgb = rgb.transpose(0, 3, 1, 2)
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, planar
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return Case(name, [ds])


def volume_case(name: str, series: list[Dataset], pixels: np.ndarray, **attributes: Any) -> Case:
    """A CT series like ``series`` holding ``pixels`` (Z, Y, X), evenly spaced."""
    step = float(series[1].ImagePositionPatient[2]) - float(series[0].ImagePositionPatient[2])
    out = []
    for k in range(pixels.shape[0]):
        ds = copy.deepcopy(series[k % len(series)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, k * step]
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = pixels.shape[1:]
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        signed = int(ds.PixelRepresentation)
        ds.PixelData = pixels[k].astype(np.int16 if signed else np.uint16).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return Case(name, out)


def _cut(pixels: np.ndarray, frames: int, rows: int, cols: int) -> np.ndarray:
    return np.resize(pixels[:frames, :rows, :cols], (frames, rows, cols))


def run_corpus(source: Dataset, seed: int, random_cases: int) -> list[Case]:
    """Cases from ``source`` (a multi-frame 12-bit XA run of at least 96 x 96 x 16)."""
    rng = np.random.default_rng(seed)
    cur = source.pixel_array.astype(np.int64)[:16, :96, :96]
    shape = cur.shape
    cases = [
        frames_case(f"{r} x {c} pixels, {t} frames", source, _cut(cur, t, r, c))
        for r, c, t in (
            (1, 1, 2),
            (1, 1, 16),
            (1, 96, 16),
            (96, 1, 16),
            (2, 2, 2),
            (3, 3, 3),
            (5, 96, 16),
            (96, 5, 16),
            (31, 97, 5),
            (96, 96, 2),
            (96, 96, 3),
        )
    ]
    wide = rng.integers(1000, 3000, (4, 3, 400))
    cases += [
        frames_case("3 x 400 pixels", source, wide),
        frames_case("400 x 3 pixels", source, wide.transpose(0, 2, 1)),
        frames_case("2000 frames of 4 x 4", source, rng.integers(1000, 3000, (2000, 4, 4))),
    ]
    grid = np.indices(shape).sum(0)
    content: dict[str, np.ndarray] = {
        "all zero": np.zeros(shape),
        "saturated": np.full(shape, 4095),
        "constant": np.full(shape, 2000),
        "one hot pixel": np.where(grid == 100, 4095, 2000),
        "checkerboard": (grid % 2) * 4095,
        "uniform noise": rng.integers(0, 4096, shape),
        "identical frames": np.repeat(cur[:1], shape[0], 0),
        "first frame bright, the rest zero": np.concatenate(
            [np.full((1, *shape[1:]), 4095), np.zeros((shape[0] - 1, *shape[1:]))]
        ),
        "a ramp over time": np.linspace(0, 4095, shape[0])[:, None, None] * np.ones(shape),
        "salt and pepper": np.where(rng.random(shape) < 0.1, rng.choice([0, 4095], shape), cur),
    }
    cases += [frames_case(name, source, pixels) for name, pixels in content.items()]
    cases += [
        frames_case("8 bits", source, cur >> 4, bits=8),
        frames_case("8 bits, 1 stored", source, cur > 2000, bits=8, stored=1),
        frames_case("16 bits, full range", source, cur * 16, stored=16),
        frames_case("signed, negative", source, cur - 4000, signed=1, stored=16),
        frames_case(
            "signed, extremes", source, np.where(cur > cur.mean(), 32767, -32768), 16, 16, 1
        ),
        frames_case("values beyond Bits Stored", source, cur + 60000),
        frames_case("MONOCHROME1", source, 4095 - cur, PhotometricInterpretation="MONOCHROME1"),
        frames_case("32 bits", source, cur * 100000, bits=32, stored=32),
        colour_case("RGB", source, 0),
        colour_case("RGB, planar", source, 1),
        colour_case("YBR_FULL", source, 0, "YBR_FULL"),
        frames_case(
            "PALETTE COLOR without its table",
            source,
            cur >> 4,
            bits=8,
            PhotometricInterpretation="PALETTE COLOR",
        ),
    ]
    for slope, intercept in RESCALES:
        cases.append(
            frames_case(
                f"Rescale Slope {slope}, Intercept {intercept}",
                source,
                cur,
                RescaleSlope=slope,
                RescaleIntercept=intercept,
            )
        )
    for k in range(random_cases):
        cases.append(_random_run(source, cur, rng, k))
    return cases


# (slope, intercept) as a sender may write them (DS strings).
RESCALES = (
    ("0", "0"),
    ("-1", "0"),
    ("1e30", "0"),
    ("1e38", "0"),
    ("1e300", "0"),
    ("NaN", "0"),
    ("1e-300", "0"),
    ("1", "1e300"),
    ("1", "-1e30"),
)


def _random_run(source: Dataset, cur: np.ndarray, rng: np.random.Generator, k: int) -> Case:
    """Several of the above at once: a size, a content, an encoding, maybe a rescale."""
    frames, rows, cols = (int(v) for v in rng.integers((1, 1, 1), (24, 130, 130)))
    makers: list[Callable[[], np.ndarray]] = [
        lambda: _cut(cur, frames, rows, cols),
        lambda: rng.integers(0, 4096, (frames, rows, cols)),
        lambda: np.full((frames, rows, cols), int(rng.integers(0, 4096))),
    ]
    pixels = makers[int(rng.integers(len(makers)))]()
    bits, signed = [(8, 0), (16, 0), (16, 1), (32, 0)][int(rng.integers(4))]
    if bits == 8:
        pixels = pixels >> 4
    attributes: dict[str, Any] = {}
    if rng.random() < 0.3:
        attributes["PhotometricInterpretation"] = "MONOCHROME1"
    if rng.random() < 0.4:
        attributes["RescaleSlope"], attributes["RescaleIntercept"] = RESCALES[
            int(rng.integers(len(RESCALES)))
        ]
    stored = 8 if bits == 8 else int(rng.choice([12, 16]))
    name = f"random {k}: {rows} x {cols} x {frames}, {bits} bits, {attributes}"
    return frames_case(name, source, pixels, bits=bits, stored=stored, signed=signed, **attributes)


def volume_corpus(series: list[Dataset], seed: int) -> list[Case]:
    """Cases from ``series`` (a CT series of at least 32 slices of 32 x 32)."""
    rng = np.random.default_rng(seed)
    pixels = np.stack([ds.pixel_array for ds in series]).astype(np.int64)[:32, :32, :32]
    signed = int(series[0].PixelRepresentation)
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    middle = int(np.median(pixels))
    cases = [
        volume_case(f"volume of {z} x {y} x {x}", series, _cut(pixels, z, y, x))
        for z, y, x in ((2, 32, 32), (4, 3, 3), (32, 1, 1), (32, 2, 2), (32, 1, 32), (32, 32, 1))
    ]
    grid = np.indices(pixels.shape).sum(0)
    content = {
        "lowest": np.full(pixels.shape, lo),
        "highest": np.full(pixels.shape, hi),
        "constant": np.full(pixels.shape, middle),
        "noise": rng.integers(lo, hi, pixels.shape),
        "checkerboard": np.where(grid % 2, hi, lo),
        "one hot voxel": np.where(grid == 40, hi, middle),
    }
    cases += [volume_case(f"volume {name}", series, v) for name, v in content.items()]
    for slope, intercept in RESCALES:
        cases.append(
            volume_case(
                f"volume Rescale Slope {slope}, Intercept {intercept}",
                series,
                pixels,
                RescaleSlope=slope,
                RescaleIntercept=intercept,
            )
        )
    return cases
