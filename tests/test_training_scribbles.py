"""``python -m training scribbles``: scribble SEGs on the node's canvas, from label images
(PNG, NumPy, NIfTI) or sampled from a full SEG; they pass dciodvfy and build-dataset reads
them as scribble annotations of the run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.conftest import dciodvfy_errors
from training.__main__ import main
from training.annotations import Resolver, read_annotation
from training.dataset import BuildOptions, build_dataset
from training.sources import FolderSource, inventory


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from training.phantoms import dsa

    root = tmp_path_factory.mktemp("scribble-phantom")
    written = dsa.generate(5, size=64, frames=6).write(root / "in", seg=True)
    return {p.name: p for p in written}


def _annotation(folder: Path):  # type: ignore[no-untyped-def]
    inv = inventory(FolderSource(folder).scan())
    resolver = Resolver(inv.run_infos(), [c.header for c in inv.canvases])
    (seg,) = inv.segs
    return read_annotation(pydicom.dcmread(seg.locator), resolver)


def test_scribbles_sampled_from_a_full_seg(phantom: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = [
        "scribbles",
        "--run",
        str(phantom["dsa.dcm"]),
        "--from-seg",
        str(phantom["dsa_seg.dcm"]),
    ]
    assert main([*args, "--fraction", "0.3", "--width", "3", "--out", str(out)]) == 0
    canvas = pydicom.dcmread(out / "canvas.dcm")
    # The node's canvas: the same UID the phantom writer (and the node) gives it.
    assert canvas.SOPInstanceUID == pydicom.dcmread(phantom["dsa_minip_sc.dcm"]).SOPInstanceUID
    assert dciodvfy_errors(out / "scribbles_seg.dcm") == []
    # Read back as the dataset builder reads it: scribbles of the run, inside the truth.
    folder = tmp_path / "archive"
    folder.mkdir()
    for p in (phantom["dsa.dcm"], out / "canvas.dcm", out / "scribbles_seg.dcm"):
        (folder / p.name).write_bytes(p.read_bytes())
    ann = _annotation(folder)
    assert ann.kind == "scribble" and ann.geometry == "canvas"
    full = _annotation(phantom["dsa.dcm"].parent)
    for role in ("artery", "vein"):
        strokes = ann.masks[role]
        assert strokes.any() and not (strokes & ~full.masks[role]).any()
        assert strokes.sum() < full.masks[role].sum() / 2
    vessels = np.logical_or.reduce([m for r, m in full.masks.items()])
    assert ann.masks["background"].any() and not (ann.masks["background"] & vessels).any()
    # Seeded: the same strokes again; another seed, other strokes.
    again = tmp_path / "again"
    assert main([*args, "--fraction", "0.3", "--width", "3", "--out", str(again)]) == 0
    a, b = (pydicom.dcmread(d / "scribbles_seg.dcm").pixel_array for d in (out, again))
    assert np.array_equal(a, b)
    manifest = build_dataset(
        FolderSource(folder),
        BuildOptions(out=tmp_path / "ds", pseudonym_map=tmp_path / "map.json"),
        progress=lambda _m: None,
    )
    assert manifest["counts"]["kind"] == {"scribble": 1}


@pytest.mark.parametrize("fmt", ["png", "npy", "nii.gz"])
def test_scribbles_from_a_label_image(
    phantom: dict[str, Path], tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture
) -> None:
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 30] = 1  # an artery stroke
    labels[40:44, 20:22] = 2  # a vein stroke
    labels[5, 5:40] = 3  # background
    path = tmp_path / f"labels.{fmt}"
    if fmt == "png":
        Image.fromarray(labels).save(path)
    elif fmt == "npy":
        np.save(path, labels)
    else:
        if importlib.util.find_spec("nibabel") is None:
            capsys.readouterr()
            base = ["scribbles", "--run", str(phantom["dsa.dcm"]), "--labels", str(path)]
            path.write_bytes(b"")
            assert main([*base, "--map", "1=artery,3=background", "--out", str(tmp_path)]) == 2
            assert "nibabel" in capsys.readouterr().err
            return
        import nibabel

        nibabel.save(nibabel.Nifti1Image(labels.T.copy(), np.eye(4)), str(path))  # x = column
    out = tmp_path / "s"
    args = ["scribbles", "--run", str(phantom["dsa.dcm"]), "--labels", str(path), "--out", str(out)]
    assert main([*args, "--map", "1=artery,2=vein,3=background"]) == 0
    assert dciodvfy_errors(out / "scribbles_seg.dcm") == []
    folder = tmp_path / "archive"
    folder.mkdir()
    for p in (phantom["dsa.dcm"], out / "canvas.dcm", out / "scribbles_seg.dcm"):
        (folder / p.name).write_bytes(p.read_bytes())
    ann = _annotation(folder)
    assert ann.kind == "scribble"
    for value, role in ((1, "artery"), (2, "vein"), (3, "background")):
        assert np.array_equal(ann.masks[role], labels == value), role
    seg = pydicom.dcmread(out / "scribbles_seg.dcm")
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert not seg.SeriesDescription.startswith("AI ")


def test_scribble_input_refused_with_the_reason(
    phantom: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 30] = 1
    np.save(tmp_path / "l.npy", labels)
    base = ["scribbles", "--run", str(phantom["dsa.dcm"]), "--out", str(tmp_path / "o")]
    cases = [
        (["--labels", str(tmp_path / "l.npy"), "--map", "1=artery"], "needs background strokes"),
        (["--labels", str(tmp_path / "l.npy"), "--map", "1=aorta,2=background"], "roles one of"),
        (["--labels", str(tmp_path / "l.npy"), "--map", "2=background"], "not in --map"),
    ]
    np.save(tmp_path / "small.npy", np.arange(32 * 32).reshape(32, 32) % 2 + 1)
    cases.append(
        (["--labels", str(tmp_path / "small.npy"), "--map", "1=artery,2=background"], "(32, 32)")
    )
    Image.new("RGB", (64, 64)).save(tmp_path / "rgb.png")
    cases.append((["--labels", str(tmp_path / "rgb.png"), "--map", "1=vein,2=background"], "RGB"))
    for extra, text in cases:
        capsys.readouterr()
        assert main([*base, *extra]) == 2, extra
        assert text in capsys.readouterr().err, extra
