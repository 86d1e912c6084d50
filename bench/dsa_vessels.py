"""Cerebral DSA vessels (``dsa_av``, ``dsa_ia``): held-out accuracy and CPU cost.

    python -m bench.dsa_vessels [--av-package DIR] [--ia-package DIR] [--cases 10]

Accuracy: A-Dice, V-Dice, M-Dice (pooled over artery and vein channels, as in
Su et al.'s evaluation code) and vessel Dice, mean +- std over held-out phantom
seeds 5000+ (training uses 1000-1099), for the classical path (the reference),
the ST U-Net package and the VSS-Net package, each through its pipeline.

Performance: seconds per run and peak resident memory, each configuration in a
fresh process, for 1024 x 1024 x 30 and 512 x 512 x 15 runs: the classical path
(the reference for the ratios), the classical path with its standout step skipped
(that step's cost), and each network at its default configuration
(timing does not depend on the weights, so untrained networks stand in), plus
node-side compute end to end for the classical path (XA file decoded,
pipeline, DICOM encoded and written durably), and the whole path through a
running node: from its C-STORE response until the SEG is stored at a dcmtk
storescp destination.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import write_section
from dicom_node import dcmtk

SIZES = ((1024, 30), (512, 15))
MODELS = {"st_unet": ("dsa_av", {}), "vss_net": ("dsa_ia", {})}
WITHOUT_STANDOUT = "classical_without_standout"


def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss it starts
    afresh at exec, so a child does not inherit its parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _phantom_run(size: int, frames: int, seed: int = 5999) -> Any:
    from training.phantoms import dsa

    return dsa.generate(seed, size=size, frames=frames).to_run()


def _save_run(run: Any, path: Path) -> Path:
    """The run for a child process, so its memory figures exclude the phantom generator."""
    np.savez(
        path,
        pixels=run.pixels,
        times=run.meta.frame_times_s,
        spacing=np.asarray(run.meta.pixel_spacing_mm),
    )
    return path


def _load_run(path: Path) -> Any:
    from pipelines.base import Run, RunMeta

    data = np.load(path)
    pixels = data["pixels"]
    meta = RunMeta(
        modality="XA",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
        rows=pixels.shape[1],
        columns=pixels.shape[2],
        number_of_frames=pixels.shape[0],
        frame_times_s=data["times"],
        subtracted=True,
        pixel_spacing_mm=(float(data["spacing"][0]), float(data["spacing"][1])),
    )
    return Run(pixels, meta)


def _xa_file(run: Any, directory: Path) -> Path:
    """The run as an XA multi-frame file, as the node would have stored it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = XRayAngiographicImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^DSA", "B1", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "XA", 1, 1
    ds.ImageType = ["DERIVED", "PRIMARY", "SINGLE PLANE", "SUBTRACTION"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    t, h, w = run.pixels.shape
    ds.Rows, ds.Columns, ds.NumberOfFrames = h, w, t
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    increments = np.diff(run.meta.frame_times_s, prepend=0.0) * 1000
    ds.FrameIncrementPointer = 0x00181065
    ds.FrameTimeVector = [float(f"{v:.6g}") for v in increments]
    ds.ImagerPixelSpacing = list(run.meta.pixel_spacing_mm)
    ds.PixelData = np.clip(run.pixels, 0, 4095).astype(np.uint16).tobytes()
    path = directory / "run.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def measure_one(kind: str, run_path: Path) -> dict[str, float]:
    """Run in a fresh process: seconds and peak RSS of one configuration."""
    import torch

    import pipelines
    from pipelines.base import PipelineContext
    from pipelines.models.package import build, write_package

    torch.set_num_threads(2)
    run = _load_run(run_path)
    with tempfile.TemporaryDirectory() as tmp:
        package = None
        pipeline = "dsa_av"
        params = 0
        if kind in MODELS:
            pipeline, config = MODELS[kind]
            model = build(kind, config)
            params = sum(p.numel() for p in model.parameters())
            package = str(
                write_package(
                    Path(tmp) / "pkg",
                    model=model,
                    name=f"bench-{kind}",
                    version="0",
                    architecture_name=kind,
                    config=config,
                    pipeline=pipeline,
                    metrics={},
                    data={"untrained": True},
                    model_card="Untrained; timing only.",
                    training_command="bench",
                    dataset_manifest_hash="0" * 64,
                )
            )
        elif kind == "minip":
            pipeline = "minip"
        elif kind == WITHOUT_STANDOUT:
            # The classical path as it was before dsa_av 0.7.0: the standout rule's
            # step skipped (every pixel stands out), so its cost is the difference
            # from the classical row. Outputs differ; only the time is used.
            import pipelines.vessels as vessels

            def every_pixel_stands_out(contrast: np.ndarray, *_: Any) -> np.ndarray:
                return np.full(contrast.shape[1:], np.inf, np.float32)

            vessels.standout = every_pixel_stands_out  # type: ignore[assignment]
        base = _rss_mb()
        if kind == "end_to_end":
            from dicom_node.encode import encode_result
            from dicom_node.encode.common import EncodeContext
            from dicom_node.processing import write_dataset
            from dicom_node.runs import load_run

            path = _xa_file(run, Path(tmp))
            pipe = pipelines.get("dsa_av")
            base = _rss_mb()
            start = time.perf_counter()
            loaded = load_run([path])
            result = pipe(loaded.run, PipelineContext(device="cpu"))
            datasets = encode_result(
                result, loaded.run, EncodeContext(sources=loaded.headers, pipeline="dsa_av")
            )
            for ds in datasets:
                write_dataset(ds, Path(tmp) / "out")
        else:
            # The pipeline's module is imported before the clock starts, as the node's
            # workers preload theirs (until 2026-12-05 the first import was timed too).
            pipe = pipelines.get(pipeline)
            start = time.perf_counter()
            pipe(run, PipelineContext(device="cpu", model_package=package))
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mb": _rss_mb(),
        "input_rss_mb": base,
        "parameters": params,
    }


def node_end_to_end(run_path: Path, package: str | None = None) -> dict[str, float]:
    """Seconds from the node's C-STORE response (the run is stored) until the SEG
    is stored at a dcmtk storescp destination, through the real node: completion,
    routing, job, pipeline, encoding, outbox, C-STORE. Also the time until the
    last object (canvas, SEG, overlay) arrived."""
    import socket

    from pydicom import dcmread
    from pydicom.uid import SegmentationStorage
    from pynetdicom import AE

    from dicom_node.service import Node
    from dicom_node.settings import load_settings

    storescp = dcmtk.find("storescp")
    if storescp is None:
        raise SystemExit("dcmtk storescp is needed for the end-to-end figure")
    run = _load_run(run_path)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = _xa_file(run, root)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        received = root / "received"
        received.mkdir()
        scp = subprocess.Popen(
            [storescp, "-aet", "DEST", "-od", str(received), "-uf", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        settings = load_settings(
            None,
            environ={},
            **{
                "storage_dir": str(root / "node"),
                "port": 0,
                "api": {"port": 0},
                "min_free_bytes": 0,
                "completion": {"quiet_period_s": 1.0, "sweep_interval_s": 0.1},
                "workers": {"poll_interval_s": 0.05},
                "outbox": {"poll_interval_s": 0.05},
                "destinations": [
                    {
                        "kind": "dimse",
                        "name": "dest",
                        "host": "127.0.0.1",
                        "port": port,
                        "ae_title": "DEST",
                    }
                ],
                "rules": [{"name": "dsa", "match": {"modality": ["XA"]}, "pipelines": ["dsa_av"]}],
                "models": {"dsa_av": package} if package else {},
            },
        )
        node = Node(settings).start()
        try:
            time.sleep(0.5)  # storescp listening
            ds = dcmread(path)
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(ds.SOPClassUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title=settings.ae_title)
            status = assoc.send_c_store(ds)
            stored = time.perf_counter()
            assoc.release()
            if int(status.Status) != 0:
                raise SystemExit(f"C-STORE failed: 0x{int(status.Status):04X}")
            seg_at, deadline = None, stored + float(os.environ.get("BENCH_E2E_TIMEOUT_S", "600"))
            seen: dict[str, str] = {}
            while time.perf_counter() < deadline:
                for f in received.iterdir():
                    if f.name not in seen and not f.name.startswith("."):
                        try:
                            seen[f.name] = str(dcmread(f, stop_before_pixels=True).SOPClassUID)
                        except (OSError, ValueError, EOFError, AttributeError):
                            continue  # still being written: read it on the next pass
                if seg_at is None and SegmentationStorage in seen.values():
                    seg_at = time.perf_counter()
                if seg_at is not None and len(seen) >= 3:
                    break
                time.sleep(0.02)
            done = time.perf_counter()
        finally:
            node.stop()
            scp.terminate()
            scp.wait(10)
    if seg_at is None:
        raise SystemExit("the SEG never arrived at the destination")
    return {"seg_s": seg_at - stored, "all_s": done - stored}


def _child(kind: str, run_path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.dsa_vessels", "--measure", kind, str(run_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def performance() -> str:
    kinds = ["minip", "classical", WITHOUT_STANDOUT, "end_to_end", "st_unet", "vss_net"]
    rows = [
        "| run | path | parameters | seconds | x classical | peak RSS (MB) | RSS before processing (MB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    node_rows = [
        "| run | stored -> SEG at destination (s) | stored -> all 3 objects (s) | "
        "x classical compute |",
        "| --- | ---: | ---: | ---: |",
    ]
    tmp = tempfile.TemporaryDirectory()
    for size, frames in SIZES:
        run_path = _save_run(_phantom_run(size, frames), Path(tmp.name) / f"run{size}.npz")
        got = {k: _child(k, run_path) for k in kinds}
        ref = got["classical"]["seconds"]
        for k in kinds:
            g = got[k]
            params = f"{g['parameters'] / 1e6:.1f} M" if g["parameters"] else "-"
            rows.append(
                f"| {size}x{size}x{frames} | {k} | {params} | {g['seconds']:.2f} | "
                f"{g['seconds'] / ref:.2f} | {g['peak_rss_mb']:.0f} | "
                f"{g['input_rss_mb']:.0f} |"
            )
        e2e = _child("node", run_path)
        node_rows.append(
            f"| {size}x{size}x{frames} | {e2e['seg_s']:.2f} | {e2e['all_s']:.2f} | "
            f"{e2e['seg_s'] / ref:.2f} |"
        )
    tmp.cleanup()
    return (
        "\n".join(rows) + "\n\nThrough the running node (classical dsa_av; a single "
        "multi-frame instance completes on arrival; loopback C-STORE to dcmtk storescp):"
        "\n\n" + "\n".join(node_rows)
    )


def _phantom_scale(package: str) -> tuple[int, int]:
    """(size, frames) of the phantoms a package was trained on, from its data.json."""
    data = json.loads((Path(package) / "data.json").read_text())
    if "phantoms" in data:  # written by python -m training package
        return int(data["phantoms"]["size"]), int(data["phantoms"]["frames"])
    return int(data["phantom_size"]), int(data["phantom_frames"])  # earlier packages


def accuracy(av_package: str | None, ia_package: str | None, cases: int) -> str:
    """Every method through the node's own pipeline (training's evaluation), on the
    held-out seeds of the dsa_av recipe."""
    from training.engine import evaluate_node
    from training.phantom_dataset import phantom_case
    from training.quick import RECIPES
    from training.tasks import TASKS

    seeds = list(RECIPES["dsa_av"].test)[:cases]
    lines = [
        "| method | A-Dice | V-Dice | M-Dice | vessel Dice | ICA Dice | A-Dice - classical |",
        "| --- | --- | --- | --- | --- | --- | ---: |",
    ]
    runs: list[tuple[str, str, str | None, int, int]] = [
        ("classical (dsa_av)", "dsa_av", None, 256, 20)
    ]
    for label, pipeline, package in (
        ("ST U-Net (dsa_av)", "dsa_av", av_package),
        ("VSS-Net (dsa_ia)", "dsa_ia", ia_package),
    ):
        if package:
            runs.append(
                (f"{label}: {Path(package).name}", pipeline, package, *_phantom_scale(package))
            )
    reference = None
    for label, pipeline, package, size, frames in runs:
        test = [
            phantom_case("dsa", s, size, frames, ("artery", "vein", "ica"), "test") for s in seeds
        ]
        summary = evaluate_node(TASKS[pipeline], test, package)["aggregate"]
        if pipeline == "dsa_av":
            summary["vessel_dice"] = summary["dice"]
        else:  # one artery channel: its Dice is the A-Dice
            summary = {"a_dice": summary["dice"]}
        cells = [
            f"{summary[k]['mean']:.3f} ± {summary[k]['std']:.3f}" if k in summary else "n/a"
            for k in ("a_dice", "v_dice", "m_dice", "vessel_dice", "ica_dice")
        ]
        if reference is None:
            reference = summary["a_dice"]["mean"]
        delta = summary["a_dice"]["mean"] - reference
        lines.append(f"| {label} | {' | '.join(cells)} | {delta:+.3f} |")
    return (
        f"Held-out phantom seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} runs, 256 x 256 x 20 "
        "frames), never used in training; every method through the node's pipeline "
        "(`training.engine.evaluate_node`).\n\n" + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--av-package", default=None)
    parser.add_argument("--ia-package", default=None)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--skip-performance", action="store_true")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "RUN_NPZ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        kind, run_path = args.measure
        if kind == "node":
            print(json.dumps(node_end_to_end(Path(run_path))))
        else:
            print(json.dumps(measure_one(kind, Path(run_path))))
        return 0
    body = "### Accuracy\n\n" + accuracy(args.av_package, args.ia_package, args.cases)
    if not args.skip_performance:
        load = os.getloadavg()
        body += (
            "\n\n### Performance (CPU, 2 threads)\n\n"
            + performance()
            + f"\n\nLoad average when the measurements started: {load[0]:.1f} (other "
            "work shares this machine, so absolute times are upper bounds)."
            + "\n\nNetworks at their default configuration (ST U-Net widths 32-256, VSS-Net "
            "16-256), untrained (timing does not depend on weights). end_to_end: XA file "
            "decoded, classical dsa_av, canvas + SEG + overlay encoded and written with "
            "fsync; network transfer not included. classical_without_standout: the classical "
            "path with the standout rule's step skipped (dsa_av 0.7.0 added it; its output "
            "differs and is not scored), for that step's cost. Peak RSS is of the whole process "
            "(Python, torch and the run included), each configuration in its own process."
        )
    write_section(
        "dsa_vessels", "Cerebral DSA vessels: artery/vein and intracranial arteries", body
    )
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
