"""Deep-model inference on the CPU: eager PyTorch against cheaper ways to run the same
models, per architecture, measured in the same run, written to BENCHMARKS.md.

    python -m bench.inference_cpu [--reps N] [--only ARCH ...] [--no-onnx] [--no-compile]

Every architecture runs through its pipeline's own inference function
(``predict_sequence`` for dsa_av and dsa_ia, ``predict_mask`` for the perfusion
ICA, ``predict_probabilities`` for xa_coronary, ``classify_dense`` for
rotational_dla), so a time includes the preprocessing a job pays, the same for
every variant. Inputs are the phantoms of ``bench.budget`` at its sizes (1024² ×
30 variable-rate DSA, 512² × 90 coronary cine, 256³ volume), generated in this
process; the cine and the volume are cut to fewer frames and slices
(``--cine-frames``, ``--slices``) so one measurement stays near a minute on two
shared cores (the cost is linear in both). Only the ST U-Net has trained weights
here (``tests/packages/dsa_av-st_unet-r1``: shipped in ``models/`` when this was
measured, withdrawn since); the other architectures are built with their default
configuration and seeded random weights (timing does not depend on the weights).

Variants, each against ``eager`` (the model as built: NCHW weights, torch's
default threads, the pipeline's default batch): ``1 thread``; ``channels-last``
(the 2D convolution weights in channels-last order); ``larger batch`` (slices or
frames per pass); ``torch.compile`` (its first call, the compilation, timed
apart); ONNX Runtime on one thread (the CNNs) or exported for one frame count
(the recurrent models; not used by the pipelines); and ``pipeline now``, the
model as ``ModelPackage.load_model`` prepares it (``prepare_model``: ONNX
Runtime for the CNNs, eager for the recurrent models).
After one warm-up call each, the variants run in turn for ``--reps`` rounds, so
load from other work hits them alike; the table gives the median wall time (and
the fastest) and the median CPU time. Each variant's output is compared with
eager's: the labels the pipeline draws from it (identical or not) and the
largest probability difference.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.models.package import build, load_package
from pipelines.models.runtime import OrtModel, channels_last_2d, onnx_runtime, prepare_model

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "tests" / "packages" / "dsa_av-st_unet-r1"  # withdrawn from models/
SECTION = "inference_cpu"
CPU = torch.device("cpu")
TOLERANCE = 1e-4  # largest probability difference a kept variant may show


@dataclass
class Case:
    """One architecture as its pipeline runs it."""

    arch: str
    pipeline: str
    size: str
    weights: str
    model: torch.nn.Module
    # run(model, options) -> the pipeline function's output: probabilities ("sigmoid"),
    # a mask or labels ("labels").
    run: Callable[[torch.nn.Module, dict[str, Any]], np.ndarray]
    output: str
    # Options of the larger-batch variant (None: the function has no batch to grow).
    batch_options: dict[str, Any] | None = None
    # What the function passes to the model (for export); dynamic first axis or not.
    example: torch.Tensor | None = None
    dynamic_batch: bool = False
    example_scale: float = 1.0


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    first_s: float = 0.0
    output: np.ndarray | None = None
    error: str = ""
    probs: np.ndarray | None = None


def _seeded(arch: str, config: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(arch, config).eval()


def _trained() -> tuple[torch.nn.Module, dict[str, Any], str]:
    """The trained package's model as built (NCHW), not as ``load_model`` prepares it."""
    pkg = load_package(TRAINED)
    model = build(pkg.architecture, pkg.config)
    data = (TRAINED / "weights.pt").read_bytes()
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    return model.eval(), dict(pkg.config), pkg.name


def cases(only: set[str] | None, cine_frames: int, slices: int) -> list[Case]:
    """The architectures at the budget bench's sizes (phantoms generated here)."""
    from pipelines.base import minip
    from pipelines.coronary import normalise_cine, predict_probabilities
    from pipelines.models.ica_unet import predict_mask
    from pipelines.preprocess import predict_sequence, resize, work_shape
    from pipelines.rotational import classify_dense
    from training.phantoms import coronary, dsa, rotational

    def want(arch: str) -> bool:
        return only is None or arch in only

    out: list[Case] = []
    if want("st_unet") or want("vss_net") or want("ica_unet"):
        run = dsa.generate(3, size=1024, frames=30).to_run()
        px, times, spacing = run.pixels, run.meta.frame_times_s, run.meta.pixel_spacing_mm
    if want("st_unet"):
        model, cfg, name = _trained()
        grid = work_shape(px.shape[1:], spacing, cfg.get("work_spacing_mm"), 512)
        out.append(
            Case(
                "st_unet",
                "dsa_av",
                f"DSA 1024² × 30, resampled to 29 frames at 1 fps, {grid[0]}² grid (one tile)",
                f"trained `{name}`",
                model,
                lambda m, o, cfg=cfg: predict_sequence(m, px, times, spacing, cfg, CPU)[0],
                "sigmoid",
                example=torch.zeros(1, 29, *grid),
            )
        )
    if want("vss_net"):
        cfg = {"fps": None}
        out.append(
            Case(
                "vss_net",
                "dsa_ia",
                "DSA 1024² × 30, all 30 frames, 512² grid (one tile)",
                "default config, random",
                _seeded("vss_net", cfg),
                lambda m, o, cfg=cfg: predict_sequence(m, px, times, spacing, cfg, CPU)[0],
                "sigmoid",
                example=torch.zeros(1, 30, 512, 512),
            )
        )
    if want("ica_unet"):
        image = minip(px)
        out.append(
            Case(
                "ica_unet",
                "dsa_perfusion",
                "MinIP of the DSA, 1024²",
                "default config, random",
                _seeded("ica_unet", {}),
                lambda m, o: predict_mask(m, image, CPU),
                "labels",
                example=torch.zeros(1, 1, 1024, 1024),
            )
        )
    if want("ce_net_3d2d"):
        cine = coronary.generate(3, size=512, frames=90, fps=15.0).to_run()
        x = normalise_cine(cine.pixels[:cine_frames])
        grid = work_shape(x.shape[1:], cine.meta.pixel_spacing_mm, None, 512)
        x = resize(torch.from_numpy(x), grid).numpy()
        out.append(
            Case(
                "ce_net_3d2d",
                "xa_coronary",
                f"cine 512², first {cine_frames} of 90 frames, 4 frames per pass",
                "default config (ResNet-34 widths), random",
                _seeded("ce_net_3d2d", {}),
                lambda m, o: predict_probabilities(m, x, 1, CPU, batch=o.get("batch", 4)),
                "sigmoid",
                batch_options={"batch": 8},
                example=torch.zeros(4, 3, *grid),
                dynamic_batch=True,
            )
        )
    if want("dla_resnet"):
        volume = rotational.generate(3, size=256).to_run().pixels[:slices]
        out.append(
            Case(
                "dla_resnet",
                "rotational_dla",
                f"volume 256³, first {slices} of 256 slices, 4 slices per pass",
                "default config, random",
                _seeded("dla_resnet", {}),
                lambda m, o: classify_dense(m, volume, CPU, slab=o.get("slab", 4)),
                "labels",
                batch_options={"slab": 16},
                example=torch.zeros(4, 5, 296, 296),
                dynamic_batch=True,
                example_scale=500.0,
            )
        )
    return out


def fixed_shape_onnx(case: Case) -> torch.nn.Module:
    """A recurrent model exported for the example's frame count only (its loop over the
    frames unrolled): what ONNX Runtime would give if the node exported one graph per
    frame count. Not used by the pipelines."""
    import onnxruntime as ort

    assert case.example is not None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(case.model), (case.example,), buffer, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return OrtModel(session, case.model)


def variants(
    case: Case, use_compile: bool, use_onnx: bool
) -> list[tuple[str, Callable[[], torch.nn.Module], dict[str, Any], int | None]]:
    """(name, model factory, run options, torch threads) per variant; eager first."""
    ort_kept = bool(getattr(case.model, "onnx_on_cpu", False))
    out: list[tuple[str, Callable[[], torch.nn.Module], dict[str, Any], int | None]] = [
        ("eager", lambda: case.model, {}, None),
        ("1 thread", lambda: case.model, {}, 1),
        ("channels-last", lambda: channels_last_2d(copy.deepcopy(case.model)), {}, None),
    ]
    if case.batch_options:
        label = ", ".join(f"{k} {v}" for k, v in case.batch_options.items())
        out.append((f"larger batch ({label})", lambda: case.model, case.batch_options, None))
    if use_compile:
        out.append(("torch.compile", lambda: torch.compile(copy.deepcopy(case.model)), {}, None))
    if use_onnx and ort_kept:
        out.append(
            ("onnxruntime, 1 thread", lambda: onnx_runtime(copy.deepcopy(case.model), 1), {}, 1)
        )
    elif use_onnx and case.example is not None:
        out.append(
            (
                "onnxruntime, input shape fixed (not used)",
                lambda: fixed_shape_onnx(case),
                {},
                None,
            )
        )
    kept = "onnxruntime" if ort_kept and use_onnx else "eager"
    out.append(
        (
            f"**pipeline now** ({kept})",
            lambda: prepare_model(copy.deepcopy(case.model), CPU, onnx=use_onnx),
            {},
            None,
        )
    )
    return out


def _timed(fn: Callable[[], np.ndarray], threads: int | None) -> tuple[float, float, np.ndarray]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        y = fn()
        return time.perf_counter() - w0, time.process_time() - c0, y
    finally:
        torch.set_num_threads(before)


def measure(
    case: Case, reps: int, use_compile: bool, use_onnx: bool
) -> dict[str, tuple[Timing, float]]:
    """Per variant: its timings and the seconds it took to prepare (export, build)."""
    models: dict[str, tuple[torch.nn.Module, dict[str, Any], int | None]] = {}
    results: dict[str, tuple[Timing, float]] = {}
    for name, factory, options, threads in variants(case, use_compile, use_onnx):
        timing = Timing()
        t0 = time.perf_counter()
        try:
            model = factory()
            prepared = time.perf_counter() - t0
            # Warm-up; for torch.compile this is the compilation.
            timing.first_s, _, timing.output = _timed(lambda: case.run(model, options), threads)  # noqa: B023
            if case.output == "labels":  # the probabilities behind the labels, on the example
                assert case.example is not None
                with torch.inference_mode():
                    torch.manual_seed(1)
                    x = torch.randn(case.example.shape) * case.example_scale
                    timing.probs = torch.softmax(model(x).float(), dim=1).numpy()
            models[name] = (model, options, threads)
        except Exception as exc:  # noqa: BLE001 (a variant that fails is reported, not fatal)
            timing.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            prepared = time.perf_counter() - t0
        results[name] = (timing, prepared)
        print(f"  {case.arch} {name}: first call {timing.first_s:.1f} s {timing.error}", flush=True)
    for r in range(reps):
        for name, (model, options, threads) in models.items():
            wall, cpu, _ = _timed(lambda: case.run(model, options), threads)  # noqa: B023
            results[name][0].wall.append(wall)
            results[name][0].cpu.append(cpu)
        line = ", ".join(f"{n} {results[n][0].wall[-1]:.1f}" for n in models)
        print(f"  {case.arch} round {r + 1}: {line}", flush=True)
    return results


def compare(ref: Timing, out: Timing) -> tuple[bool, float]:
    """Labels identical, and the largest probability difference: of the pipeline's
    output, or for label outputs of the softmax on a random example input."""
    assert ref.output is not None and out.output is not None
    if ref.probs is None or out.probs is None:
        same = np.array_equal(ref.output >= 0.5, out.output >= 0.5)
        return bool(same), float(np.abs(ref.output - out.output).max())
    return bool(np.array_equal(ref.output, out.output)), float(np.abs(ref.probs - out.probs).max())


def table(case: Case, results: dict[str, tuple[Timing, float]]) -> list[str]:
    eager = results["eager"][0]
    ref_wall = statistics.median(eager.wall) if eager.wall else float("nan")
    rows = []
    for name, (t, prepared) in results.items():
        if t.error or not t.wall:
            rows.append(f"| {case.arch} | {name} | failed: {t.error or 'no result'} ||||||")
            continue
        wall, cpu = statistics.median(t.wall), statistics.median(t.cpu)
        same, diff = compare(eager, t)
        first = t.first_s - wall
        extra = ""
        if name == "torch.compile":
            extra = f"compile ≈ {first:.0f} s"
        elif "onnxruntime" in name:
            extra = f"export + session {prepared:.0f} s"
        rows.append(
            f"| {case.arch} | {name} | {wall:.2f} ({min(t.wall):.2f}) | {cpu:.2f} | "
            f"{ref_wall / wall:.2f}× | {'yes' if same else '**no**'} | "
            f"{diff:.1e} | {extra} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="architectures (default: all)")
    parser.add_argument("--cine-frames", type=int, default=24)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    try:
        import onnxruntime

        ort_version: str | None = onnxruntime.__version__
    except ImportError:
        ort_version = None
    use_onnx = not args.no_onnx and ort_version is not None
    load_before = os.getloadavg()[0]
    rows: list[str] = []
    sizes: list[str] = []
    for case in cases(set(args.only) if args.only else None, args.cine_frames, args.slices):
        print(f"{case.arch} ({case.pipeline}): {case.size}", flush=True)
        results = measure(case, args.reps, not args.no_compile, use_onnx)
        rows += table(case, results)
        sizes.append(f"- `{case.arch}` ({case.pipeline}, {case.weights}): {case.size}.")
    load_after = os.getloadavg()[0]
    body = "\n".join(
        [
            f"torch {torch.__version__}, {torch.get_num_threads()} threads by default "
            f"(as in the sandbox's forkserver workers), "
            + (f"onnxruntime {ort_version}" if ort_version else "onnxruntime not installed")
            + f"; {args.reps} rounds after a warm-up call, variants in turn. Load average "
            f"{load_before:.1f} before and {load_after:.1f} after, on cores shared with other "
            "work: compare the ratios (same run), not the absolute seconds.",
            "",
            "Inputs (the pipeline's own inference function, preprocessing included):",
            *sizes,
            "",
            "| architecture | variant | wall s, median (fastest) | CPU s | speed vs eager "
            "| labels as eager | largest prob. difference | note |",
            "|---|---|---:|---:|---:|---|---:|---|",
            *rows,
        ]
    )
    print(body)
    if not args.no_write:
        from bench.report import write_section

        write_section(SECTION, "Deep inference on the CPU: eager against the variants", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
