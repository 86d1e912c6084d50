"""A mosaic of randomised phantoms for the docs, so a reader can judge the priors by eye.

    python -m training.phantoms.gallery docs/img/phantoms_randomised.png

Top row: randomised cerebral DSA (subtracted at the arterial peak, one native
frame); bottom row: coronary cine frames at full opacification and 3D-RA
slabs. Each tile is shown through the window its DICOM header carries
(the 3D slabs through a fixed 0-1500 HU window, so contrast levels compare).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.phantoms import coronary, dsa, rotational

TILE = 320


def _windowed(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    centre, width = window
    return np.clip((image.astype(np.float64) - (centre - width / 2)) / width * 255, 0, 255)


def _tile(image: np.ndarray, label: str) -> Image.Image:
    """Fit an 8-bit image into a square tile (keeping its aspect) with a caption."""
    img = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    scale = TILE / max(img.size)
    img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))))
    tile = Image.new("L", (TILE, TILE), 24)
    tile.paste(img, ((TILE - img.size[0]) // 2, (TILE - img.size[1]) // 2))
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default(size=13)
    draw.rectangle([0, TILE - 18, TILE, TILE], fill=0)
    draw.text((4, TILE - 16), label, fill=255, font=font)
    return tile


def tiles() -> list[Image.Image]:
    out = []
    for seed in (2, 5, 11):
        p = dsa.generate(seed, frames=12, randomise=True)
        k = int(np.argmin(np.abs(p.frame_times_s - p.timing["arterial_peak_s"] - 0.5)))
        a = p.appearance
        rows, cols = p.pixels.shape[1:]
        label = f"DSA {rows}x{cols} {a['bits']}b SNR {a['snr']:.0f}"
        if a["jpeg_quality"]:
            label += f" JPEG q{a['jpeg_quality']}"
        out.append(_tile(_windowed(p.pixels[k], p.presentation.window), label))
    p = dsa.generate(7, frames=8, native=True, randomise=True)
    log = np.log(np.maximum(p.pixels[-1].astype(np.float64), 1.0))
    lo, hi = np.percentile(log, [1, 99.5])
    out.append(_tile((log - lo) / (hi - lo) * 255, f"native {p.acquisition.view}, log display"))
    for seed in (4, 11):
        c = coronary.generate(seed, frames=30, randomise=True)
        k = int(np.argmax(c.truth["vessel"].sum(axis=(1, 2))))
        a = c.appearance
        label = f"cine {c.acquisition.view} {a['fps'][0]:g} fps SNR {a['snr']:.0f}"
        out.append(_tile(_windowed(c.pixels[k], c.presentation.window), label))
    for seed in (4, 6):
        v = rotational.generate(seed, size=192, randomise=True)
        z = int(np.argmax((v.truth["labels"] == 1).sum(axis=(1, 2))))
        slab = v.hu[max(0, z - 5) : z + 6].max(axis=0)
        label = f"3D-RA slab, lumen {v.appearance['contrast_hu']:.0f} HU"
        out.append(_tile(_windowed(slab, (750.0, 1500.0)), label))
    return out


def mosaic(path: Path) -> Path:
    parts = tiles()
    cols = 4
    rows = -(-len(parts) // cols)
    sheet = Image.new("L", (cols * TILE, rows * TILE), 0)
    for i, tile in enumerate(parts):
        sheet.paste(tile, ((i % cols) * TILE, (i // cols) * TILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, nargs="?", default=Path("phantoms_randomised.png"))
    print(mosaic(parser.parse_args(argv).output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
