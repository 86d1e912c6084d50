"""The training package: metrics, losses, augmentation, annotations, dataset build
(patient split, manifest hash, de-identification), the engine's modes, resume
and DDP. Small images and tiny networks, so the file runs in well under two
minutes on one CPU core."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes

from dicom_node.encode.canvas import make_canvas
from dicom_node.encode.common import EncodeContext
from tests.conftest import dciodvfy_errors
from tests.dicomgen import save, xa_run
from training import augment, losses
from training import metrics as M
from training.annotations import Annotation, Resolver, label_targets, merge, read_annotation
from training.dataset import (
    BuildOptions,
    DatasetError,
    Pseudonyms,
    build_dataset,
    deidentify,
    load_dataset,
    manifest_hash,
    patient_split,
)
from training.engine import DistInfo, TrainConfig, Trainer
from training.sources import FolderSource, SpoolSource, inventory, split_multipart

torch.set_num_threads(1)
SIZE = 64
TINY_VSS = {"widths": [4, 8]}


# ---------------------------------------------------------------------------
# Annotated runs built here: an XA run, its MinIP canvas and a SEG on the canvas


def vessel_mask(seed: int = 0) -> np.ndarray:
    """The vessel ``tests.dicomgen.xa_run`` draws (same formula)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.abs(xx - SIZE / 2 - 6 * np.sin(yy / 9)) < 3


def seg_on(
    canvas: pydicom.Dataset,
    masks: list[np.ndarray],
    types: list[hd.sr.CodedConcept],
    description: str = "Manual annotation",
) -> hd.seg.Segmentation:
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=str(t.meaning)[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=t,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, t in enumerate(types)
    ]
    seg = hd.seg.Segmentation(
        source_images=[canvas],
        pixel_array=np.stack(masks, axis=-1)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=50,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        omit_empty_frames=False,
    )
    seg.SeriesDescription = description
    return seg


def write_case(directory: Path, seed: int, patient: str, kind: str | None = "full") -> Path:
    """One run (+ canvas + SEG unless ``kind`` is None); returns the run file."""
    ds = xa_run(frames=6, rows=SIZE, cols=SIZE, seed=seed)
    ds.PatientID = patient
    ds.PatientName = f"DOE^{patient}"
    run_path = save(ds, directory, f"run{seed}.dcm")
    if kind is None:
        return run_path
    header = pydicom.dcmread(run_path, stop_before_pixels=True)
    pixels = ds.pixel_array.reshape(6, SIZE, SIZE).astype(np.float32)
    canvas = make_canvas(EncodeContext([header], pipeline="test"), pixels.min(axis=0))
    save(canvas, directory, f"canvas{seed}.dcm")
    vessel = vessel_mask(seed)
    top = np.zeros_like(vessel)
    top[: SIZE // 2] = True
    if kind == "full":
        seg = seg_on(canvas, [vessel & top, vessel & ~top], [codes.SCT.Artery, codes.SCT.Vein])
    elif kind == "scribble":
        art = np.zeros_like(vessel)
        art[10:20, SIZE // 2] = vessel[10:20, SIZE // 2]
        bg = np.zeros_like(vessel)
        bg[5:50, 5] = True
        seg = seg_on(canvas, [art, bg], [codes.SCT.Artery, codes.DCM.Background])
    elif kind == "unknown-codes":
        seg = seg_on(canvas, [vessel], [codes.SCT.Liver])
    else:  # a result of the node, not an annotation
        seg = seg_on(canvas, [vessel], [codes.SCT.Artery], description="AI Arteries")
        for item in seg.SegmentSequence:
            item.SegmentAlgorithmType = "AUTOMATIC"
            item.SegmentAlgorithmName = "dsa_av"
    save(seg, directory, f"seg{seed}.dcm")
    return run_path


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten patients, two annotated runs for one of them, scribbles, unlabelled and unusable runs."""
    root = tmp_path_factory.mktemp("archive")
    for i in range(8):
        write_case(root / f"p{i}", i, f"PAT{i:03d}")
    write_case(root / "p0b", 20, "PAT000")  # the same patient twice
    write_case(root / "s", 30, "PAT030", kind="scribble")
    write_case(root / "u", 40, "PAT040", kind=None)
    write_case(root / "x", 50, "PAT050", kind="unknown-codes")
    write_case(root / "ai", 60, "PAT060", kind="node-result")
    return root


@pytest.fixture(scope="module")
def dataset(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dataset")
    out, pmap = base / "ds", base / "secret" / "map.json"
    build_dataset(
        FolderSource(archive),
        BuildOptions(
            out=out,
            pseudonym_map=pmap,
            test_fraction=0.2,
            val_fraction=0.2,
            include_unlabelled=True,
        ),
    )
    return out, pmap


# ---------------------------------------------------------------------------
# Metrics against hand-computed values


def test_overlap_metrics_by_hand() -> None:
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)  # 4 positives
    pred = np.array([[1, 0, 1, 0], [1, 0, 0, 0]], bool)  # tp 2, fp 1, fn 2, tn 3
    m = M.binary_metrics(pred, truth, topology=False)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    empty = np.zeros((3, 3), bool)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(empty, ~empty) == 0.0


def test_auc_by_hand_with_ties() -> None:
    assert M.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)) == pytest.approx(
        0.75
    )
    assert M.auc(np.array([0.5, 0.5]), np.array([0, 1], bool)) == pytest.approx(0.5)
    assert math.isnan(M.auc(np.array([0.2, 0.3]), np.array([1, 1], bool)))


def test_cldice_and_connectivity_by_hand() -> None:
    truth = np.zeros((11, 20), bool)
    truth[5, :] = True  # a one-pixel line is its own skeleton
    pred = np.zeros_like(truth)
    pred[5, :10] = True
    # topology precision 10/10, topology sensitivity 10/20 -> 2 * 1 * 0.5 / 1.5
    assert M.cldice(pred, truth) == pytest.approx(2 / 3)
    broken = np.zeros_like(truth)
    broken[5, [0, 1, 5, 6, 12]] = True  # three 8-connected components
    assert M.components(broken) == 3
    assert M.connectivity(broken, truth) == pytest.approx((3 + 1) / (1 + 1))


def test_artery_vein_dice_by_hand() -> None:
    ta = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    pa = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)  # overlap 2 of 4 and 4
    tv = np.array([0, 0, 0, 0, 0, 0, 1, 1], bool)
    pv = tv.copy()
    m = M.av_metrics(pa, pv, ta, tv)
    assert m["a_dice"] == pytest.approx(0.5)
    assert m["v_dice"] == pytest.approx(1.0)
    assert m["m_dice"] == pytest.approx(2 * (2 + 2) / (4 + 4 + 2 + 2))


def test_aggregate_mean_std_skips_nan() -> None:
    agg = M.aggregate([{"dice": 0.5, "auc": float("nan")}, {"dice": 1.0, "auc": 0.8}])
    sd = math.sqrt(0.125)  # sample SD of 0.5 and 1.0
    half = 12.706204736174698 * sd / math.sqrt(2)  # t(0.975, 1)
    assert agg["dice"]["mean"] == 0.75 and agg["dice"]["std"] == 0.25 and agg["dice"]["n"] == 2
    assert agg["dice"]["sd"] == pytest.approx(sd)
    assert agg["dice"]["ci95"] == pytest.approx([0.75 - half, 0.75 + half])
    assert agg["auc"]["n"] == 1 and agg["auc"]["mean"] == pytest.approx(0.8)
    assert math.isnan(agg["auc"]["sd"])
    table = M.format_table({"m": agg}, ["dice", "auc"])
    assert f"0.750 ± {sd:.3f} (95 % CI" in table and "0.800 (n=1: no SD)" in table


# ---------------------------------------------------------------------------
# Losses


def test_losses_by_hand() -> None:
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert losses.cross_entropy(logits, target).item() == pytest.approx(math.log(2))
    valid = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    logits2 = torch.tensor([[[[2.0, -9.0], [-9.0, 9.0]]]])
    # partial CE: only the valid pixel counts, BCE(2, 1) = log(1 + e^-2)
    assert losses.partial_cross_entropy(logits2, target, valid).item() == pytest.approx(
        math.log1p(math.exp(-2))
    )
    # softmax CE with one-hot targets, two classes, uniform logits: log 2
    one_hot = torch.tensor([[[[1.0]], [[0.0]]]])
    assert losses.cross_entropy(
        torch.zeros(1, 2, 1, 1), one_hot, multilabel=False
    ).item() == pytest.approx(math.log(2))
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert losses.soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.ce_dice_loss(perfect, target).item() < 1e-6
    assert losses.consistency_mse(perfect, perfect, True).item() == 0.0
    pseudo = torch.ones(1, 1, 2, 2)
    corrected = losses.scribble_corrected(pseudo, torch.zeros_like(pseudo), valid)
    assert corrected.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert losses.cross_entropy(logits, target, torch.zeros_like(target)).item() == 0.0


# ---------------------------------------------------------------------------
# Augmentation


def test_flip_and_alignment_of_different_sizes() -> None:
    rng = np.random.default_rng(0)
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    (xf,), (yf,) = augment.geometric(
        [x], [x.clone()], rng, augment.Geometric(flip_p=1.0, affine_p=0.0)
    )
    assert torch.allclose(xf, x.flip(-1)) and torch.equal(yf, x.flip(-1))
    # A context-padded input and its centre label stay aligned under any transform.
    big = torch.rand(3, 1, 28, 28)
    centre = big[..., 6:22, 6:22].clone()
    (_,), (wb, wc) = augment.geometric(
        [big], [big, centre], np.random.default_rng(3), augment.Geometric(flip_p=0.5, affine_p=1.0)
    )
    inner = wb[..., 6:22, 6:22]
    inside = wc != 0
    agree = (inner[inside] == wc[inside]).float().mean().item()
    assert agree > 0.97, agree


def test_frame_contrast_and_strong_are_seeded() -> None:
    x = torch.ones(2, 5, 4, 4)
    a = augment.frame_contrast(x, np.random.default_rng(1), 0.2)
    assert torch.equal(a, augment.frame_contrast(x, np.random.default_rng(1), 0.2))
    gains = a[:, :, 0, 0]
    assert ((gains >= 0.8) & (gains <= 1.2)).all() and gains.unique().numel() > 1
    assert torch.equal(
        augment.strong(x, np.random.default_rng(2)), augment.strong(x, np.random.default_rng(2))
    )


# ---------------------------------------------------------------------------
# Annotations


def test_seg_on_canvas_resolves_to_the_run(archive: Path) -> None:
    inv = inventory(FolderSource(archive).scan())
    resolver = Resolver(inv.run_infos(), [c.header for c in inv.canvases])
    results = {}
    for seg in inv.segs:
        ds = pydicom.dcmread(seg.locator)
        results[seg.locator.split("/")[-2]] = read_annotation(ds, resolver)
    full = results["p1"]
    assert full.kind == "full" and full.geometry == "canvas"
    assert full.roles == ["artery", "vein"]
    assert np.array_equal(full.masks["artery"] | full.masks["vein"], vessel_mask())
    run_uid = str(
        pydicom.dcmread(archive / "p1" / "run1.dcm", stop_before_pixels=True).SOPInstanceUID
    )
    assert full.run_key == run_uid
    scribble = results["s"]
    assert scribble.kind == "scribble" and "background" in scribble.masks
    target, valid = label_targets(scribble, ["artery"])
    assert valid[0].sum() == scribble.masks["artery"].sum() + scribble.masks["background"].sum()
    assert not target[0][scribble.masks["background"]].any()
    assert "no segment with a known property type" in results["x"].reason
    assert "result of this node" in results["ai"].reason
    # A run with both a full annotation and scribbles keeps the full one and says so.
    merged, problems = merge([scribble_as(full, scribble), full])
    assert merged[full.run_key].kind == "full" and len(problems) == 1
    assert "also has a full annotation" in problems[0].reason


def scribble_as(full: Annotation, scribble: Annotation) -> Annotation:
    return Annotation(
        run_key=full.run_key,
        kind="scribble",
        geometry="canvas",
        masks=scribble.masks,
        seg_uids=["1.2.3.4"],
    )


# ---------------------------------------------------------------------------
# Dataset: split, manifest, de-identification


def test_patient_split_is_disjoint_deterministic_and_order_free() -> None:
    patients = [f"P{i}" for i in range(50)]
    a = patient_split(patients, 0.2, 0.1, seed=7)
    b = patient_split(list(reversed(patients)) + patients[:5], 0.2, 0.1, seed=7)
    assert a == b
    # A hash of each patient decides (stable when patients are added): about the fractions.
    assert 5 <= list(a.values()).count("test") <= 15 and 1 <= list(a.values()).count("val") <= 10
    assert patient_split(patients, 0.2, 0.1, seed=8) != a


def test_dataset_splits_by_patient_and_reports_unusable_runs(dataset: tuple[Path, Path]) -> None:
    out, pmap = dataset
    manifest, cases = load_dataset(out)
    by_patient: dict[str, set[str]] = {}
    for c in manifest["cases"]:
        by_patient.setdefault(c["patient"], set()).add(c["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert max(len([c for c in manifest["cases"] if c["patient"] == p]) for p in by_patient) == 2
    kinds = manifest["counts"]["kind"]
    assert kinds == {"full": 9, "scribble": 1, "unlabelled": 3}
    reasons = " ".join(p["reason"] for p in manifest["problems"])
    assert "no segment with a known property type" in reasons and "result of this node" in reasons
    # Unlabelled runs are flagged, never turned into all-background labels.
    for c in cases:
        if c.kind == "unlabelled":
            assert c.masks == {} and not c.labelled


def test_manifest_is_deidentified_and_hash_stable(
    dataset: tuple[Path, Path], archive: Path, tmp_path: Path
) -> None:
    out, pmap = dataset
    text = (out / "manifest.json").read_text()
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in archive.rglob("*.dcm")]
    for ds in originals:
        assert str(ds.PatientID) not in text and str(ds.SOPInstanceUID) not in text
        assert str(ds.StudyInstanceUID) not in text
    secret = json.loads(pmap.read_text())
    assert set(secret["patients"].values()) >= {"PAT000", "PAT030"}
    digest = manifest_hash(out)
    assert (out / "manifest.sha256").read_text().split()[0] == digest
    # Rebuilt elsewhere with the same pseudonym map: byte-identical manifest and cases.
    again = tmp_path / "again"
    build_dataset(
        FolderSource(archive),
        BuildOptions(
            out=again,
            pseudonym_map=pmap,
            test_fraction=0.2,
            val_fraction=0.2,
            include_unlabelled=True,
        ),
    )
    assert manifest_hash(again) == digest
    # A different split seed is a different dataset.
    other = tmp_path / "other"
    build_dataset(
        FolderSource(archive),
        BuildOptions(out=other, pseudonym_map=pmap, seed=1, include_unlabelled=True),
    )
    assert manifest_hash(other) != digest
    with pytest.raises(DatasetError, match="must not lie inside"):
        build_dataset(
            FolderSource(archive), BuildOptions(out=again, pseudonym_map=again / "map.json")
        )


def test_deidentify_profile_and_dciodvfy(tmp_path: Path) -> None:
    from training.phantoms import dsa

    paths = dsa.generate(3, size=64, frames=4).write(tmp_path / "ph", seg=True)
    xa_path = next(p for p in paths if p.name == "dsa.dcm")
    original = pydicom.dcmread(xa_path)
    original.add_new(0x00091010, "LO", "private secret")
    pseud = Pseudonyms(salt="s" * 64)
    out = deidentify(original, pseud)
    assert out.PatientID != original.PatientID and out.PatientID == out.PatientName
    assert pseud.patients[out.PatientID] == original.PatientID
    assert out.SOPInstanceUID.startswith("2.25.") and out.SOPClassUID == original.SOPClassUID
    assert pseud.uids[out.StudyInstanceUID] == original.StudyInstanceUID
    assert out.StudyDate != original.StudyDate and len(out.StudyDate) == 8
    assert "InstitutionName" not in out and out.AccessionNumber == "" and out.PatientBirthDate == ""
    assert 0x00091010 not in out and out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    written = tmp_path / "deid.dcm"
    out.save_as(written, enforce_file_format=True)
    assert dciodvfy_errors(written) == []
    seg = deidentify(pydicom.dcmread(next(p for p in paths if p.name == "dsa_seg.dcm")), pseud)
    seg.save_as(tmp_path / "deid_seg.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "deid_seg.dcm") == []
    # References inside the SEG follow the renamed canvas.
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert ref in pseud.uids


# ---------------------------------------------------------------------------
# Sources


def test_multipart_and_spool_source(tmp_path: Path) -> None:
    body = b"--abc\r\nContent-Type: application/dicom\r\n\r\nONE\r\n--abc\r\n\r\nTWO\r\n--abc--\r\n"
    assert split_multipart(body, 'multipart/related; type="application/dicom"; boundary=abc') == [
        b"ONE",
        b"TWO",
    ]
    from dicom_node.db import Database
    from dicom_node.spool import Spool

    storage = tmp_path / "node"
    spool = Spool(storage, Database(storage / "node.sqlite"))
    path = save(xa_run(seed=1), tmp_path / "in")
    spool.store(path.read_bytes())
    found = SpoolSource(storage).scan()
    assert [i.sop_instance_uid for i in found] == [str(pydicom.dcmread(path).SOPInstanceUID)]


# ---------------------------------------------------------------------------
# Engine: one step of each mode, resume, DDP


def _split(dataset: tuple[Path, Path]) -> tuple[list, list, list]:
    _, cases = load_dataset(dataset[0])
    labelled = [c for c in cases if c.kind == "full"]
    return labelled[:3], labelled[3:4], [c for c in cases if c.kind == "unlabelled"][:1]


def _one_step(**options: Any) -> TrainConfig:
    """A tiny VSS-Net trained for one step of two 32-pixel patches."""
    base = {"task": "dsa_ia", "model_config": TINY_VSS, "epochs": 1, "steps_per_epoch": 1}
    return TrainConfig(**{**base, "batch_size": 2, "patch": 32, "progress": False, **options})


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_sscr_step_on_scribbles(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    _, cases = load_dataset(dataset[0])
    scribbles = [c for c in cases if c.kind == "scribble"]
    cfg = _one_step(mode="sscr", no_validation=True)
    t = Trainer(cfg, scribbles, [], tmp_path)
    before = [_weights(m) for m in t.models]
    assert not torch.equal(before[0], before[1])  # two differently initialised networks
    loss_all = t._loss_sscr(t._rng(0))
    t.cfg.use_ps = t.cfg.use_cps = t.cfg.use_cr = False
    loss_pce = t._loss_sscr(t._rng(0))
    assert torch.isfinite(loss_all) and loss_all.item() > loss_pce.item() > 0
    t.cfg.use_ps = t.cfg.use_cps = t.cfg.use_cr = True
    t.fit()
    after = [_weights(m) for m in t.models]
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_strong_augmentation_of_labelled_batches(
    dataset: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--strong-augment``: supervised steps see the photometric augmentation too (gain,
    offset, noise, blur), drawn from the step's seed; off by default."""
    from training.__main__ import build_parser, train_config

    base = ["train", "--dataset", "d", "--task", "dsa_ia", "--workdir", "w"]
    assert train_config(build_parser().parse_args(base)).strong_augment is False
    assert train_config(build_parser().parse_args([*base, "--strong-augment"])).strong_augment

    train, _, _ = _split(dataset)
    cfg = _one_step(no_validation=True)
    t = Trainer(cfg, train, [], tmp_path)
    seen: list[torch.Tensor] = []
    real = t._forward
    monkeypatch.setattr(t, "_forward", lambda model, x: (seen.append(x.clone()), real(model, x))[1])
    for strong in (False, False, True, True):
        t.cfg.strong_augment = strong
        t._step(0, 0)
        t.state["step"] = 0  # the same batch and draws each time
    plain, again, strong1, strong2 = seen
    assert torch.equal(plain, again) and torch.equal(strong1, strong2)  # seeded
    assert not torch.allclose(plain, strong1)


def test_rpst_teacher_student_steps(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    train, val, unlabelled = _split(dataset)
    cfg = _one_step(mode="rpst", rpst_rounds=1)
    t = Trainer(cfg, train[:1], val, tmp_path, unlabelled=unlabelled)
    path = t.fit()
    assert len(t.pseudo) == 1 and t.pseudo[0].y is not None
    history = [h["phase"] for h in t.state["history"]]
    assert history == ["teacher", "student1"]
    teacher = torch.load(tmp_path / "best-teacher.pt", weights_only=True)["state_dict"]
    student = torch.load(path, weights_only=True)
    assert student["phase"] == "student1"
    assert any(not torch.equal(teacher[k], student["state_dict"][k]) for k in teacher)


def test_checkpoint_resume_reproduces_uninterrupted_run(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    train, val, _ = _split(dataset)
    cfg = TrainConfig(
        task="dsa_av",
        model_config={"widths": [4, 8]},
        epochs=2,
        steps_per_epoch=2,
        batch_size=2,
        patch=32,
        progress=False,
    )
    straight = Trainer(cfg, train, val, tmp_path / "a")
    straight.fit()
    first = Trainer(cfg, train, val, tmp_path / "b")
    first.fit(stop_after=1)
    assert first.state["epoch"] == 1
    resumed = Trainer(cfg, train, val, tmp_path / "b")
    resumed.fit(resume=tmp_path / "b" / "last.pt")
    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for sa, sb in zip(last_a["models"], last_b["models"], strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert last_a["state"]["step"] == last_b["state"]["step"] == 4
    for a, b in zip(straight.models, resumed.models, strict=True):
        assert torch.equal(_weights(a), _weights(b))
    assert straight.state["history"][-1]["loss"] == resumed.state["history"][-1]["loss"]
    for name in ("learning_curve.png", "examples.png", "model.pt", "last.pt"):
        assert (tmp_path / "b" / name).is_file()


def _ddp_worker(rank: int, init_file: str, dataset_dir: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    _, cases = load_dataset(dataset_dir)
    train = [c for c in cases if c.kind == "full"][:2]
    cfg = TrainConfig(
        task="dsa_ia",
        model_config=TINY_VSS,
        epochs=1,
        steps_per_epoch=2,
        batch_size=1,
        patch=32,
        progress=False,
        device="cpu",
        no_validation=True,
    )
    t = Trainer(cfg, train, [], Path(out) / "run", dist_info=DistInfo(rank=rank, world=2))
    before = _weights(t.models[0].module)
    t.fit()
    torch.save(
        {"before": before, "after": _weights(t.models[0].module)}, Path(out) / f"rank{rank}.pt"
    )
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_stay_in_sync(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(dataset[0]), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["before"], r1["before"])  # same seed on both ranks
    assert torch.equal(r0["after"], r1["after"]) and not torch.equal(r0["before"], r0["after"])
    # Without gradient averaging the two ranks' batch streams would diverge.
    _, cases = load_dataset(dataset[0])
    train = [c for c in cases if c.kind == "full"][:2]
    solo = []
    for rank in (0, 1):
        cfg = TrainConfig(
            task="dsa_ia",
            model_config=TINY_VSS,
            epochs=1,
            steps_per_epoch=2,
            batch_size=1,
            patch=32,
            progress=False,
            device="cpu",
            no_validation=True,
        )
        t = Trainer(
            cfg, train, [], tmp_path / f"solo{rank}", dist_info=DistInfo(rank=rank, world=1)
        )
        t.fit()
        solo.append(_weights(t.models[0]))
    assert not torch.equal(solo[0], solo[1])
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()


def test_torchrun_cli(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "training",
            "train",
            "--dataset",
            str(dataset[0]),
            "--task",
            "dsa_ia",
            "--workdir",
            str(tmp_path / "w"),
            "--config",
            json.dumps(TINY_VSS),
            "--epochs",
            "1",
            "--steps",
            "1",
            "--batch",
            "1",
            "--patch",
            "32",
            "--device",
            "cpu",
            "--no-progress",
            # What is tested is the launcher and the record, not the split: the
            # fixture's random salt may leave no fully annotated run in val.
            "--no-validation",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    assert (tmp_path / "w" / "model.pt").is_file()
    # The record names the launcher and the world size, and so does its reproduce line.
    record = json.loads((tmp_path / "w" / "run.json").read_text())
    assert record["world_size"] == 2
    assert record["command"].startswith(
        "torchrun --standalone --nproc-per-node 2 -m training train"
    )
    assert record["reproduce"].startswith("torchrun --standalone --nproc-per-node 2 -m training")


# ---------------------------------------------------------------------------
# One stack: quick recipes on the engine, evaluation through the node, the shipping gate


def _quick_args(work: Path, *extra: str) -> list[str]:
    return [
        "quick",
        "dsa_ia",
        "--workdir",
        str(work),
        "--size",
        "64",
        "--frames",
        "6",
        "--train-cases",
        "3",
        "--val-cases",
        "1",
        "--test-cases",
        "1",
        "--epochs",
        "2",
        "--steps",
        "2",
        "--batch",
        "2",
        "--patch",
        "32",
        "--config",
        json.dumps({"widths": [4, 8]}),
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_quick_trains_resumes_and_packages_through_the_gate(
    dataset: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    """A short real training run of the single stack: a family A phantom dataset, the
    engine (stopped by its time budget after one epoch, resumed to the end, bit for bit
    the uninterrupted run), and the package command's gate: refused without an
    evaluation, refused below the margin, written with the evaluation recorded and
    logged when the node loads the package."""
    from pipelines.models.package import load_package
    from training.__main__ import main

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_quick_args(straight)) == 0
    assert main(_quick_args(split, "--max-minutes", "0")) == 0  # budget spent: one epoch
    first = torch.load(split / "run" / "last.pt", weights_only=True)
    assert first["state"]["epoch"] == 1 and not (split / "run" / "model.pt").exists()
    assert main(_quick_args(split, "--resume")) == 0
    a = torch.load(straight / "run" / "model.pt", weights_only=True)
    b = torch.load(split / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["dataset_sha256"] == manifest_hash(split / "data") == manifest_hash(straight / "data")
    manifest = json.loads((split / "data" / "manifest.json").read_text())
    assert manifest["counts"]["split"] == {"test": 1, "train": 3, "val": 1}
    assert {c["meta"]["manufacturer_model_name"] for c in manifest["cases"]} == {"Angio Phantom"}
    assert isinstance(a["model_config"]["work_spacing_mm"], float)  # "auto" resolved

    model, data = split / "run" / "model.pt", split / "data"
    base = ["package", "--model", str(model), "--dataset", str(data), "--name", "ia"]
    out = tmp_path / "pkg"
    assert main([*base, "--out", str(out), "--version", "1"]) == 2  # no evaluation: refused
    assert main([*base, "--eval-dataset", str(data), "--out", str(out), "--version", "1"]) == 2
    site = ["--eval-dataset", str(dataset[0])]  # site data (not synthetic), never trained on
    assert main([*base, *site, *site, "--out", str(out), "--version", "1"]) == 2  # given twice
    assert "is given twice" in capsys.readouterr().err
    assert main([*base, *site, "--out", str(out), "--version", "1", "--min-margin", "2"]) == 2
    assert not out.exists()
    caplog.set_level(logging.INFO, logger="pipelines.models.package")
    assert main([*base, *site, "--out", str(out), "--version", "1", "--min-margin", "-1"]) == 0
    pkg = load_package(out, pipeline="dsa_ia")
    ev = pkg.meta["evaluation"]
    assert ev["families"] == ["site"] and ev["trained_on"] == ["Angio Phantom"]
    assert ev["metric"] == "dice" and ev["n"] == 9 and ev["min_margin_used"] == -1.0
    for who in ("model", "classical", "difference"):
        lo, hi = ev[who]["ci95"]
        assert lo <= ev[who]["mean"] <= hi and ev[who]["n"] == 9
    assert ev["difference"]["mean"] == pytest.approx(ev["model"]["mean"] - ev["classical"]["mean"])
    assert ev["beats_classical_by_required_margin"] == (ev["difference"]["mean"] >= 0.03)
    assert pkg.meta["training_command"].startswith("python -m training quick dsa_ia")
    assert (
        "## Evaluation on data the model was not trained on"
        in pkg.path.joinpath("MODEL_CARD.md").read_text()
    )
    logged = [r.getMessage() for r in caplog.records if r.name == "pipelines.models.package"]
    assert any("site data" in m and "classical path" in m and "model" in m for m in logged)
    # The per-case figures are the node's: the pipeline with the package on an eval case.
    _, cases = load_dataset(dataset[0])
    (ood,) = pkg.metrics["out_of_distribution"]
    assert ood["dataset"] == ev["dataset"] and ood["manifest_sha256"] == ev["manifest_sha256"]
    case = next(c for c in cases if c.id in ood["model"]["cases"])
    from training.tasks import TASKS

    node = TASKS["dsa_ia"].score(TASKS["dsa_ia"].node_masks(case.run(), str(out)), case)
    assert {**node, "failed": 0.0} == ood["model"]["cases"][case.id]


def _family_b_archive(root: Path) -> Path:
    """Family A phantom files relabelled with family B's ManufacturerModelName (what the
    refusal reads), with their SEG annotations."""
    from training.gate import FAMILY_B_MODEL_NAME
    from training.phantoms import dsa

    for seed in (1, 2):
        for path in dsa.generate(seed, size=64, frames=4).write(root, seg=True):
            if path.suffix == ".dcm":
                ds = pydicom.dcmread(path)
                if ds.Modality == "XA":
                    ds.ManufacturerModelName = FAMILY_B_MODEL_NAME
                    ds.save_as(path, enforce_file_format=True)
    return root


def test_family_b_is_refused_for_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from training.__main__ import main
    from training.gate import FAMILY_A_MODEL_NAME, GateError, refuse_evaluation_only
    from training.phantoms import dsa

    # What family A writes is what the gate calls family A.
    written = dsa.generate(3, size=64, frames=4).write(tmp_path / "a")
    assert pydicom.dcmread(written[0]).ManufacturerModelName == FAMILY_A_MODEL_NAME

    out = tmp_path / "ds"
    build_dataset(
        FolderSource(_family_b_archive(tmp_path / "b")),
        BuildOptions(out=out, pseudonym_map=tmp_path / "map.json", export_dicom=True),
    )
    train = ["train", "--dataset", str(out), "--task", "dsa_ia", "--workdir", str(tmp_path / "w")]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert "family B" in err and "PHANTOM-FAMILY-B" in err and "evaluation only" in err
    assert not (tmp_path / "w").exists()
    # The engine refuses the cases themselves too (any caller, not only the CLI).
    _, cases = load_dataset(out)
    with pytest.raises(GateError, match="family B"):
        Trainer(TrainConfig(task="dsa_ia", progress=False), cases, [], tmp_path / "w2")
    # A manifest without the recorded model name: read from the de-identified DICOM copy...
    manifest = json.loads((out / "manifest.json").read_text())
    for c in manifest["cases"]:
        del c["meta"]["manufacturer_model_name"]
    with pytest.raises(GateError, match="family B"):
        refuse_evaluation_only(out, manifest)
    # ... and without that either, the family is unknown: refused, rebuild.
    with pytest.raises(GateError, match="rebuild"):
        refuse_evaluation_only(tmp_path / "elsewhere", manifest)


def test_family_b_phantom_dataset_evaluates_but_never_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The real family B generator builds evaluation data; training on it is refused."""
    from training.__main__ import main
    from training.gate import FAMILY_B_MODEL_NAME
    from training.phantom_dataset import generator

    try:
        generator("B", "dsa")
    except DatasetError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "b"
    build = ["phantom-dataset", "dsa", "--family", "B", "--size", "64", "--roles", "artery"]
    assert main([*build, "--test", "0:1", "--train", "1:1", "--out", str(out), "--name", "b"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert {c["meta"]["manufacturer_model_name"] for c in manifest["cases"]} == {
        FAMILY_B_MODEL_NAME
    }
    capsys.readouterr()
    work = ["--workdir", str(tmp_path / "w"), "--device", "cpu", "--no-progress"]
    assert main(["train", "--dataset", str(out), "--task", "dsa_ia", *work]) == 2
    assert "evaluation only" in capsys.readouterr().err
    assert main(["tune-classical", "xa_coronary", "--dataset", str(out)]) == 2


def test_invalid_config_json_exits_2(dataset: tuple[Path, Path], capsys) -> None:  # type: ignore[no-untyped-def]
    from training.__main__ import main

    args = ["train", "--dataset", str(dataset[0]), "--task", "dsa_ia", "--workdir", "/nonexistent"]
    assert main([*args, "--config", '{"widths": [4,']) == 2
    assert "--config: invalid JSON" in capsys.readouterr().err
    assert main([*args, "--config", "[4, 8]"]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


def test_gate_checks_and_confidence_interval() -> None:
    from training.gate import (
        EvaluationPart,
        GateError,
        check_held_out,
        evaluation_record,
        smallest_margin,
        summary,
    )

    s = summary([0.5, 0.6, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["sd"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half]) and s["n"] == 3

    def case(i: str, name: str, synthetic: bool, patient: str = "") -> dict:
        meta = {"manufacturer_model_name": name}
        return {
            "id": i,
            "split": "train",
            "kind": "full",
            "synthetic": synthetic,
            "meta": meta,
            "sha256": i,
            "instances": [f"uid-{i}"],
            "patient": patient or i,
        }

    train = {"cases": [case("a1", "Angio Phantom", True)]}
    family_b = {"cases": [case("b1", "PHANTOM-FAMILY-B", True)]}
    same_family = {"cases": [case("a2", "Angio Phantom", True)]}
    site = {"cases": [case("s1", "Artis", False)]}
    site_seen = {"cases": [case("s2", "Artis", False, patient="a1")]}
    assert check_held_out("t", train, "1", "e", family_b, "2")["families"] == ["PHANTOM-FAMILY-B"]
    assert check_held_out("t", train, "1", "e", site, "2")["families"] == ["site"]
    with pytest.raises(GateError, match="is the training dataset"):
        check_held_out("t", train, "1", "e", family_b, "1")
    with pytest.raises(GateError, match="which the training dataset contains"):
        check_held_out("t", train, "1", "e", same_family, "2")
    with pytest.raises(GateError, match="also appears in the training dataset"):
        check_held_out("t", train, "1", "e", site_seen, "2")
    held_out = {"families": ["PHANTOM-FAMILY-B"], "trained_on": ["Angio Phantom"]}

    def part(name: str, model: dict, classical: dict) -> EvaluationPart:
        dataset = {"name": name, "version": "1", "manifest_sha256": f"h-{name}", "source": "s"}
        return EvaluationPart(dataset, held_out, model, classical)

    b256 = part(
        "b256",
        {"x": {"dice": 0.8}, "y": {"dice": 0.9}},
        {"x": {"dice": 0.7}, "y": {"dice": 0.7}, "z": {"dice": 0.1}},
    )
    record = evaluation_record(metric="dice", parts=[b256], pipeline="dsa_ia", min_margin=0.03)
    assert record["n"] == 2  # the same cases for both
    assert record["failed"] == {"model": 0, "classical": 0}
    assert record["difference"]["mean"] == pytest.approx(0.15)
    assert record["beats_classical_by_required_margin"] and "by_dataset" not in record
    assert smallest_margin(record) == (pytest.approx(0.15), "b256")
    # A second dataset where the model loses: the pooled mean still wins (+0.05), but the
    # gate takes the worst dataset.
    b192 = part(
        "b192",
        {"p": {"dice": 0.5, "failed": 1.0}, "q": {"dice": 0.6}},
        {"p": {"dice": 0.55}, "q": {"dice": 0.65}},
    )
    both = evaluation_record(metric="dice", parts=[b256, b192], pipeline="dsa_ia", min_margin=0)
    assert both["n"] == 4 and both["failed"] == {"model": 1, "classical": 0}
    assert both["difference"]["mean"] == pytest.approx(0.05)
    assert [r["dataset"] for r in both["by_dataset"]] == ["b256", "b192"]
    assert both["by_dataset"][1]["difference"]["mean"] == pytest.approx(-0.05)
    assert not both["beats_classical_by_required_margin"] and both["decided_by"] == "b192"
    assert smallest_margin(both) == (pytest.approx(-0.05), "b192")
    assert both["manifest_sha256"] == "h-b256 + h-b192"
    with pytest.raises(GateError, match="no case of evaluation dataset b192"):
        evaluation_record(
            metric="dice", parts=[b256, part("b192", {"p": {}}, {})], pipeline="x", min_margin=0
        )


def test_tune_classical_on_the_training_split(tmp_path: Path) -> None:
    """The classical coronary thresholds, searched on a phantom dataset's training runs."""
    from training.__main__ import main
    from training.classical import CORONARY_GRID
    from training.phantom_dataset import PhantomSpec, build_phantom_dataset

    spec = PhantomSpec("coronary", 64, 8, ("vessel",), {"train": [3000], "test": [3900]})
    build_phantom_dataset(tmp_path / "c", spec, "c", progress=lambda _m: None)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "tune-classical",
            "xa_coronary",
            "--dataset",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["training_runs"] == 1 and 0.0 <= result["iou"] <= 1.0
    low, high = result["best"]["hysteresis"]
    assert low in CORONARY_GRID["low"] and high in CORONARY_GRID["high"]
    assert main(["tune-classical", "rotational_dla", "--dataset", str(tmp_path / "c")]) == 2


def test_a_run_the_pipeline_refuses_scores_as_empty_output() -> None:
    """What the node answers to a run its pipeline refuses is nothing: counted, not dropped."""
    from training.dataset import Case
    from training.engine import evaluate_node
    from training.phantom_dataset import phantom_case
    from training.tasks import TASKS

    case = phantom_case("dsa", 3, 64, 4, ("artery", "vein"), "test")
    short = Case(
        "short", "p", "test", "full", "canvas", case.pixels[:2], case.masks,
        case.frame_times_s[:2], {**case.meta, "number_of_frames": 2},
    )  # fmt: skip
    result = evaluate_node(TASKS["dsa_av"], [case, short])
    assert result["cases"]["short"]["failed"] == 1.0 and result["cases"][case.id]["failed"] == 0
    assert result["cases"]["short"]["dice"] == 0.0 and "frames" in result["failures"]["short"]
    assert result["aggregate"]["failed"]["mean"] == 0.5


def test_phantom_dataset_with_domain_randomisation(tmp_path: Path) -> None:
    """The recipes can train on family A's randomised phantoms (what the retraining uses)."""
    from training.phantom_dataset import PhantomSpec, build_phantom_dataset

    spec = PhantomSpec("dsa", 64, 4, ("artery",), {"train": [7, 8]}, randomise=True)
    manifest = build_phantom_dataset(tmp_path / "r", spec, "r", progress=lambda _m: None)
    assert "randomised" in manifest["source"] and manifest["phantoms"]["randomise"] is True
    spacings = {c["meta"]["pixel_spacing_mm"][0] for c in manifest["cases"]}
    assert len(spacings) == 2  # the field of view is drawn per run
    with pytest.raises(DatasetError, match="no domain randomisation"):
        spec_b = PhantomSpec("dsa", 64, None, ("artery",), {"test": [0]}, "B", randomise=True)
        build_phantom_dataset(tmp_path / "b", spec_b, "b", progress=lambda _m: None)


def test_phantom_dataset_built_by_several_processes_is_the_same_dataset(tmp_path: Path) -> None:
    """``workers`` generates seeds in parallel (a long training's dataset on a many-core
    machine): the same case files and manifest hash as one seed at a time, so a
    dataset built there can be rebuilt anywhere for the gate."""
    from training.dataset import manifest_hash
    from training.phantom_dataset import PhantomSpec, build_phantom_dataset

    spec = PhantomSpec("dsa", 64, 4, ("artery",), {"train": [7, 9, 8], "val": [3]}, randomise=True)
    one = build_phantom_dataset(tmp_path / "one", spec, "d", progress=lambda _m: None)
    said: list[str] = []
    two = build_phantom_dataset(tmp_path / "two", spec, "d", progress=said.append, workers=2)
    assert [c["id"] for c in two["cases"]] == [c["id"] for c in one["cases"]]
    assert [c["sha256"] for c in two["cases"]] == [c["sha256"] for c in one["cases"]]
    assert manifest_hash(tmp_path / "two") == manifest_hash(tmp_path / "one")
    assert sum("seed" in m for m in said) == 4


def test_volume_task_keeps_boolean_targets_and_balances_patch_centres() -> None:
    """rotational_dla holds each case's targets as booleans (a quarter of float32:
    twelve 256^3 float cases were OOM-killed) with a sample of each class's voxels,
    and its patches are centred on the three classes alike."""
    from pipelines.models.dla import CLASS_BONE, CLASS_SOFT, CLASS_VESSEL
    from training.phantom_dataset import phantom_case
    from training.tasks import TASKS

    case = phantom_case("rotational", 3, 48, None, ("vessel", "bone"))
    task = TASKS["rotational_dla"]
    prepared = task.prepare(case, {})
    assert prepared.y is not None and prepared.valid is not None
    assert prepared.y.dtype == torch.bool and prepared.valid.dtype == torch.bool
    assert prepared.centres is not None
    for k, pool in enumerate(prepared.centres):
        assert len(pool) > 0
        z, r, c = pool.T
        assert prepared.y[k][z, r, c].all()  # every centre is a voxel of its class
    again = task.prepare(case, {})
    assert all(np.array_equal(a, b) for a, b in zip(prepared.centres, again.centres, strict=True))

    rng = np.random.default_rng(0)
    batch = task.batch([prepared], rng, 96, 16, {})
    assert batch.y.dtype == torch.float32 and batch.valid.dtype == torch.float32
    centre = batch.y[:, :, 8, 8].argmax(dim=1)  # the class at each patch's centre (or near)
    counts = torch.bincount(centre, minlength=3)
    for k in (CLASS_VESSEL, CLASS_BONE, CLASS_SOFT):
        assert counts[k] >= 10, counts  # about a third each, never one class only


def _dla_model(seed: int = 0) -> torch.nn.Module:
    from pipelines.models.package import build

    torch.manual_seed(seed)
    return build("dla_resnet", {"width": 4}).eval()  # vessel margins 0.06-0.74 on the case


def test_dla_calibration_counts_what_the_node_then_decides() -> None:
    """The vessel logit offset is chosen from Dice counts over every offset at once;
    each count equals the Dice of the node's own decision (``classify_dense`` with
    that offset), and the dense and patch-wise decisions agree under the offset."""
    from pipelines.base import PipelineError
    from pipelines.rotational import class_bias, classify_dense, classify_patches
    from training.calibration import GRID, vessel_bias
    from training.phantom_dataset import phantom_case
    from training.tasks import TASKS

    task = TASKS["rotational_dla"]
    case = phantom_case("rotational", 3, 32, None, ("vessel", "bone", "soft_tissue"), "val")
    model = _dla_model()
    result = vessel_bias(task, model, [case])
    assert result["cases"] == [case.id] and len(result["dice_by_offset"]) == len(GRID)
    truth = task.truth(case)
    vessel = truth["vessel"].astype(bool)
    labelled = vessel | truth["bone"].astype(bool) | truth["soft_tissue"].astype(bool)
    cpu = torch.device("cpu")
    choice = result["class_bias"][0]
    for offset in sorted({-8.0, -2.0, 0.0, 2.0, choice}):
        called = classify_dense(model, case.pixels, cpu, bias=[offset, 0.0, 0.0]) == 0
        tp = int((called & vessel & labelled).sum())
        dice = 2 * tp / max(int((called & labelled).sum()) + int(vessel.sum()), 1)
        assert abs(dice - result["dice_by_offset"][f"{offset:g}"]) < 1e-4, offset
    assert result["vessel_dice"] == pytest.approx(max(result["dice_by_offset"].values()), abs=1e-4)
    assert result["class_bias"][1:] == [0.0, 0.0] and choice in GRID
    called = {
        b: (classify_dense(model, case.pixels, cpu, bias=[b, 0, 0]) == 0).sum() for b in (-8, 2)
    }
    assert called[-8] < called[2]  # the offset moves the decision
    coords = np.argwhere(np.ones(case.pixels.shape, bool))[::97]
    dense = classify_dense(model, case.pixels, cpu, bias=[choice, 0, 0])
    patches = classify_patches(model, case.pixels, coords, cpu, bias=[choice, 0, 0])
    np.testing.assert_array_equal(patches, dense[tuple(coords.T)])
    assert class_bias({}) is None and class_bias({"class_bias": [1, 0, 0]}) == (1.0, 0.0, 0.0)
    for bad in ([1, 0], ["x", 0, 0], [float("nan"), 0, 0], 3):
        with pytest.raises(PipelineError, match="class_bias"):
            class_bias({"class_bias": bad})


def test_calibrate_writes_the_offset_into_the_model_and_refuses_family_b(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from training.__main__ import main
    from training.engine import CHECKPOINT_FORMAT, load_model_file
    from training.phantom_dataset import PhantomSpec, build_phantom_dataset

    roles = ("vessel", "bone", "soft_tissue")
    spec = PhantomSpec("rotational", 32, None, roles, {"train": [2000], "val": [2100]})
    build_phantom_dataset(tmp_path / "a", spec, "a", progress=lambda _m: None)
    model = _dla_model()
    weights = tmp_path / "model.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "task": "rotational_dla",
            "architecture": "dla_resnet",
            "model_config": {"width": 4},
            "state_dict": model.state_dict(),
        },
        weights,
    )
    out = tmp_path / "calibrated.pt"
    args = ["calibrate", "--model", str(weights), "--dataset", str(tmp_path / "a")]
    assert main([*args, "--out", str(out)]) == 0
    assert "vessel logit offset" in capsys.readouterr().out
    _, again, data = load_model_file(out)
    offset = data["model_config"]["class_bias"]
    assert len(offset) == 3 and data["calibration"]["split"] == "val"
    assert data["calibration"]["cases"] == ["a-rotational-002100"]
    assert main([*args, "--out", str(out)]) == 2  # exists, no --force
    spec_b = PhantomSpec("rotational", 32, None, roles, {"val": [0]}, "B")
    build_phantom_dataset(tmp_path / "b", spec_b, "b", progress=lambda _m: None)
    assert main(["calibrate", "--model", str(weights), "--dataset", str(tmp_path / "b"),
                 "--out", str(tmp_path / "b.pt")]) == 2  # fmt: skip
    assert "family B" in capsys.readouterr().err and not (tmp_path / "b.pt").exists()


def test_the_node_decides_with_the_packages_class_bias() -> None:
    """The rotational pipeline takes ``class_bias`` from the package and says so."""
    from pipelines.base import PipelineContext, SegmentationOutput, get
    from training.engine import stage_package
    from training.phantom_dataset import phantom_case
    from training.tasks import TASKS

    task = TASKS["rotational_dla"]
    case = phantom_case("rotational", 3, 32, None, ("vessel", "bone", "soft_tissue"), "val")
    model = _dla_model()
    vessel_voxels = {}
    for offset in (-100.0, 0.0):
        config = {"width": 4, "class_bias": [offset, 0.0, 0.0]}
        with stage_package(task, model, config) as package:
            result = get("rotational_dla")(case.run(), PipelineContext(model_package=package))
        (seg,) = [o for o in result.outputs if isinstance(o, SegmentationOutput)]
        vessel_voxels[offset] = int(seg.masks[0].sum())
        assert any(f"class logit offsets (vessel, bone, soft tissue) ({offset}" in n
                   for n in result.notes)  # fmt: skip
    assert vessel_voxels[-100.0] == 0 < vessel_voxels[0.0]


def test_quick_rotational_dla_packages_the_calibrated_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The DLA recipe calibrates its vessel decision on its validation run before the
    gate evaluates it, so the package carries (and the node uses) ``class_bias``."""
    from pipelines.models.package import load_package
    from training.__main__ import main

    work, out = tmp_path / "w", tmp_path / "pkg"
    args = [
        "quick", "rotational_dla", "--workdir", str(work), "--size", "32",
        "--train-cases", "1", "--val-cases", "1", "--test-cases", "1",
        "--epochs", "1", "--steps", "1", "--batch", "1", "--patch", "16",
        "--config", json.dumps({"width": 4}), "--device", "cpu", "--no-progress",
        "--out", str(out), "--name", "dla", "--version", "1",
        "--eval-family", "B", "--eval-cases", "1", "--eval-sizes", "32,40", "--min-margin", "-1",
    ]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "vessel decision calibrated on 1 validation run(s)" in err
    calibrated = torch.load(work / "run" / "model-calibrated.pt", weights_only=True)
    pkg = load_package(out, pipeline="rotational_dla")
    assert pkg.config["class_bias"] == calibrated["model_config"]["class_bias"]
    assert calibrated["calibration"]["cases"] == ["a-rotational-002100"]
    # The checkpoint was chosen by the calibrated decision's Dice, which the
    # calibration of the chosen weights then reproduces.
    (row,) = json.loads((work / "run" / "metrics.json").read_text())
    assert row["monitor"] == "val_calibrated_dice"
    assert row["score"] == row["val_calibrated_dice"]
    assert row["val_calibrated_dice"] == pytest.approx(calibrated["calibration"]["vessel_dice"])
    assert row["val_calibrated_offset"] == calibrated["model_config"]["class_bias"][0]
    # The gate evaluated family B at both sizes, each on its own, and the pooled figure.
    ev = pkg.meta["evaluation"]
    names = ["rotational-family-b-32", "rotational-family-b-40"]
    assert [r["dataset"] for r in ev["by_dataset"]] == names and ev["n"] == 2
    assert [json.loads((work / f"eval-family-b-{n}" / "manifest.json").read_text())["source"]
            for n in (32, 40)] == [r["source"] for r in ev["by_dataset"]]  # fmt: skip
    assert ev["decided_by"] in names
    assert min(r["difference"]["mean"] for r in ev["by_dataset"]) == pytest.approx(
        next(r for r in ev["by_dataset"] if r["dataset"] == ev["decided_by"])["difference"]["mean"]
    )
    assert [o["dataset"] for o in pkg.metrics["out_of_distribution"]] == names
    assert "rotational-family-b-40 (n=1)" in err  # the gate's line names each dataset
    assert "Per dataset" in (out / "MODEL_CARD.md").read_text()


def test_the_ica_task_shrinks_the_minip_as_the_node_does() -> None:
    """With ``max_side`` in its config, the ICA task trains on the MinIP shrunk as
    ``pipelines.models.ica_unet.predict_mask`` shrinks it, labels with it."""
    from training.phantom_dataset import phantom_case
    from training.tasks import TASKS

    case = phantom_case("dsa", 3, 128, 6, ("ica",))
    task = TASKS["dsa_perfusion"]
    assert task.default_config["max_side"] == 256
    full = task.prepare(case, {"levels": 5})
    half = task.prepare(case, {"levels": 5, "max_side": 64})
    assert tuple(full.x.shape[-2:]) == case.pixels.shape[-2:]
    assert tuple(half.x.shape[-2:]) == (64, 64)
    assert half.y is not None and half.valid is not None and full.y is not None
    assert tuple(half.y.shape) == (2, 64, 64) and set(half.y.unique().tolist()) <= {0.0, 1.0}
    # the ICA keeps its place and about a quarter of its pixels
    assert float(half.y[1].sum()) == pytest.approx(float(full.y[1].sum()) / 4, rel=0.3)
    rows = float(torch.nonzero(half.y[1])[:, 0].float().mean()) * 2
    assert rows == pytest.approx(float(torch.nonzero(full.y[1])[:, 0].float().mean()), abs=4)
