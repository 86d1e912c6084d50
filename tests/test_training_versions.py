"""Dataset versions: an existing name + version is never rewritten, splits are stable when
the archive grows, and a new version lists what changed against the previous one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_training import write_case
from training.__main__ import main
from training.dataset import (
    BuildOptions,
    DatasetError,
    build_dataset,
    load_dataset,
    manifest_hash,
    patient_split,
)
from training.sources import FolderSource


def test_split_is_stable_when_patients_are_added() -> None:
    first = [f"P{i:04d}" for i in range(300)]
    grown = first + [f"Q{i:04d}" for i in range(700)]
    a = patient_split(first, 0.2, 0.1, seed=0)
    b = patient_split(list(reversed(grown)), 0.2, 0.1, seed=0)
    assert all(b[p] == a[p] for p in first)  # 0 patients change split
    counts = {s: list(b.values()).count(s) for s in ("train", "val", "test")}
    assert 140 < counts["test"] < 260 and 60 < counts["val"] < 140, counts
    assert patient_split(grown, 0.2, 0.1, seed=1) != b
    # Carried assignments win over the rule; tiny sets still get a test and a val patient.
    carried = {p: "train" for p in first}
    assert all(v == "train" for p, v in patient_split(first, 0.2, 0.1, 0, carried).items())
    tiny = patient_split(["A", "B", "C"], 0.2, 0.2, seed=0)
    assert sorted(tiny.values()) == ["test", "train", "val"]


def test_a_small_dataset_never_leaves_a_needed_split_empty() -> None:
    """Train from 1 patient, test from 2, val from 3, whatever the hashes: the
    tutorial's 6 patients once landed all in test and val (a fresh salt each
    build), and training stopped with no training run."""
    for n in range(1, 9):
        needed = {"train", "test", "val"}
        needed = {"train"} if n == 1 else {"train", "test"} if n == 2 else needed
        for seed in range(400):
            split = patient_split([f"S{seed}-{i}" for i in range(n)], 0.2, 0.2, seed=0)
            assert needed <= set(split.values()), (n, seed, split)
    # No fraction, no patient moved there.
    assert set(patient_split(["A", "B", "C", "D"], 0.0, 0.0, seed=0).values()) == {"train"}


def _build(src: Path, out: Path, pmap: Path, **kw) -> dict:  # type: ignore[no-untyped-def]
    return build_dataset(
        FolderSource(src),
        BuildOptions(out=out, pseudonym_map=pmap, test_fraction=0.2, val_fraction=0.2, **kw),
        progress=lambda _m: None,
    )


def test_a_version_is_never_rewritten_and_splits_survive_growth(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    archive, pmap = tmp_path / "archive", tmp_path / "secret" / "map.json"
    for i in range(6):
        write_case(archive / f"p{i}", i, f"PAT{i:03d}")
    v1 = tmp_path / "data" / "ds-1"
    first = _build(archive, v1, pmap, name="ds", version="1")
    sha1 = manifest_hash(v1)
    splits1 = {c["id"]: c["split"] for c in first["cases"]}
    assert len(splits1) == 6 and "changes" not in first

    # The archive grows: the same name/version at the same place is refused, untouched.
    for i in range(6, 12):
        write_case(archive / f"p{i}", i, f"PAT{i:03d}")
    args = ["build-dataset", "--folder", str(archive), "--pseudonym-map", str(pmap)]
    args += ["--test-fraction", "0.2", "--val-fraction", "0.2", "--name", "ds"]
    capsys.readouterr()
    assert main([*args, "--out", str(v1), "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "never rewritten" in err and "6 case(s) added" in err and "--version 2" in err
    assert manifest_hash(v1) == sha1 and not (tmp_path / "data" / ".ds-1.building").exists()

    # A new version next to it: every earlier case keeps its split, the changes are listed.
    v2 = tmp_path / "data" / "ds-2"
    assert main([*args, "--out", str(v2), "--version", "2", "--previous", str(v1)]) == 0
    second = json.loads((v2 / "manifest.json").read_text())
    splits2 = {c["id"]: c["split"] for c in second["cases"]}
    assert len(splits2) == 12 and all(splits2[i] == s for i, s in splits1.items())
    changes = second["changes"]
    assert changes["previous"] == {"name": "ds", "version": "1", "manifest_sha256": sha1}
    assert len(changes["added"]) == 6 and changes["removed"] == changes["split_moves"] == []
    assert changes["counts"]["unchanged"] == 6
    load_dataset(v2)  # verifies
    # Building the same again is a no-op; the previous version stays as it was.
    digest2 = manifest_hash(v2)
    assert main([*args, "--out", str(v2), "--version", "2", "--previous", str(v1)]) == 0
    assert manifest_hash(v2) == digest2 and manifest_hash(v1) == sha1
    with pytest.raises(DatasetError, match="another --version"):
        _build(archive, tmp_path / "x", pmap, name="ds", version="1", previous=v1)

    # --force replaces a version and says what changes; its patients keep their splits.
    shutil.rmtree(archive / "p0")
    capsys.readouterr()
    assert main([*args, "--out", str(v1), "--version", "1", "--force"]) == 0
    err = capsys.readouterr().err
    assert "--force: replacing" in err and "6 case(s) added" in err and "1 removed" in err
    forced = json.loads((v1 / "manifest.json").read_text())
    assert all(splits1[c["id"]] == c["split"] for c in forced["cases"] if c["id"] in splits1)
    assert len(forced["cases"]) == 11


def test_phantom_dataset_versions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ph"
    base = ["phantom-dataset", "dsa", "--size", "64", "--frames", "4", "--roles", "artery"]
    base += ["--out", str(out), "--name", "ph"]
    assert main([*base, "--train", "1:2"]) == 0
    digest = manifest_hash(out)
    assert main([*base, "--train", "1:2"]) == 0 and manifest_hash(out) == digest  # reused
    capsys.readouterr()
    assert main([*base, "--train", "1:3"]) == 2
    assert "1 case(s) added (train 1)" in capsys.readouterr().err
    assert manifest_hash(out) == digest
    assert main([*base, "--train", "1:3", "--force"]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["cases"] == 3
