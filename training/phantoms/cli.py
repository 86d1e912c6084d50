"""``dicom-node synth``: write phantom runs with their truth to a folder.

    dicom-node synth dsa --output out/ --count 10 --seed 100 --size 512 --frames 20
    dicom-node synth dsa --output out/ --native --encoding jpeg-lossless --seg
    dicom-node synth coronary --output out/ --frames 45
    dicom-node synth rotational --output out/ --size 256 --seg
    dicom-node synth dsa --output out/ --count 100 --randomise      # training data
    dicom-node synth coronary --output out/ --randomise --size 768x1024
    dicom-node synth dsa --output out/ --count 6 --seg --send 127.0.0.1:4242 --aec ORTHANC

``--send HOST:PORT`` stores every DICOM file written (runs, canvases, SEGs) by
C-STORE, proposing exactly their SOP classes and transfer syntaxes. With dcmtk
instead: ``storescu -aec ORTHANC +sd +r +sp '*.dcm' -R HOST PORT out/`` (only the
``.dcm`` files, and only the contexts they need: the default list has no SEG).

Seeds run from ``--seed`` to ``--seed + count - 1``; each seed is one fake
patient (Patient ID ``PH<KIND><seed>``), so the output splits by patient.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from training.phantoms.dicom_common import ENCODINGS
from training.phantoms.errors import PhantomError

KINDS = ("dsa", "coronary", "rotational")
DEFAULT_SIZE = {"dsa": 512, "coronary": 512, "rotational": 256}
DEFAULT_FRAMES = {"dsa": 20, "coronary": 45}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="phantom kind")
    parser.add_argument("--output", "-o", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--count", type=int, default=1, help="number of runs (one patient each)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument(
        "--size",
        type=_size,
        default=None,
        help="matrix (2D: N or ROWSxCOLUMNS) or voxels per side (3D); with --randomise "
        "and no --size, 2D matrices are drawn (512-1024, non-square too)",
    )
    parser.add_argument("--frames", type=int, default=None, help="frames per run (2D kinds)")
    parser.add_argument("--native", action="store_true", help="dsa: unsubtracted run with a mask")
    parser.add_argument("--encoding", choices=ENCODINGS, default="explicit", help="transfer syntax")
    parser.add_argument("--seg", action="store_true", help="also write the truth as DICOM SEG")
    parser.add_argument(
        "--randomise",
        action="store_true",
        help="draw appearance per seed from the documented priors (domain randomisation, "
        "docs/phantoms.md); without it, the fixed default appearance",
    )
    parser.add_argument(
        "--send", metavar="HOST:PORT", help="then C-STORE every DICOM file written to it"
    )
    parser.add_argument("--aet", default="SYNTH", help="calling AE title for --send")
    parser.add_argument("--aec", default="ANY-SCP", help="called AE title for --send")


def _size(text: str) -> int | tuple[int, int]:
    """``512`` or ``768x1024`` (rows x columns)."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be N or ROWSxCOLUMNS, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"size must be N or ROWSxCOLUMNS, got {text!r}")


def run(args: argparse.Namespace) -> int:
    """Generate and write; returns a process exit status (2 for a usage or tool problem)."""
    try:
        return _run(args)
    except PhantomError as exc:
        print(f"synth: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from training.phantoms import coronary, dsa, rotational

    if args.count < 1:
        raise PhantomError(f"--count must be at least 1, got {args.count}")
    if args.native and args.kind != "dsa":
        raise PhantomError("--native applies to the dsa kind only")
    if args.frames is not None and args.kind == "rotational":
        raise PhantomError("--frames does not apply to rotational volumes")
    if args.kind == "rotational" and isinstance(args.size, tuple):
        raise PhantomError("--size for rotational volumes is one number (voxels per side)")
    if args.frames is not None and args.frames < 1:  # 0 was taken for the default
        raise PhantomError(f"--frames must be at least 1, got {args.frames}")
    try:  # a traceback at the first run's write, before
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PhantomError(f"--output {args.output}: {exc.strerror or exc}") from None
    randomise = bool(getattr(args, "randomise", False))
    size = args.size
    if size is None and not (randomise and args.kind != "rotational"):
        size = DEFAULT_SIZE[args.kind]
    frames = args.frames or DEFAULT_FRAMES.get(args.kind)
    total = 0
    dicom_files: list[Path] = []
    for seed in range(args.seed, args.seed + args.count):
        start = time.perf_counter()
        if args.kind == "dsa":
            phantom = dsa.generate(
                seed, size=size, frames=frames, native=args.native, randomise=randomise
            )
        elif args.kind == "coronary":
            phantom = coronary.generate(seed, size=size, frames=frames, randomise=randomise)
        else:
            phantom = rotational.generate(seed, size=size, randomise=randomise)
        files = phantom.write(args.output, encoding=args.encoding, seg=args.seg)
        total += len(files)
        dicom_files += [f for f in files if f.suffix == ".dcm"]
        print(
            f"{args.kind} seed {seed}: {len(files)} files in {files[0].parent} ({time.perf_counter() - start:.1f} s)"
        )
    print(f"wrote {total} files for {args.count} run(s) to {args.output}")
    if getattr(args, "send", None):
        send(dicom_files, args.send, args.aet, args.aec)
    return 0


def send(files: list[Path], address: str, aet: str, aec: str) -> None:
    """C-STORE ``files`` over one association proposing their SOP classes and transfer
    syntaxes (the SEG and SC classes too); PhantomError unless every file is stored."""
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PhantomError(f"--send {address!r}: expected HOST:PORT")
    syntaxes: dict[str, set[str]] = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        syntaxes.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    ae = AE(ae_title=aet)
    contexts = [
        build_context(c, sorted(ts | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
        for c, ts in sorted(syntaxes.items())
    ]
    assoc = ae.associate(host, int(port), contexts=contexts, ae_title=aec)
    if not assoc.is_established:
        raise PhantomError(f"--send: no association with {aec}@{host}:{port}")
    failed = []
    try:
        for f in files:
            status = assoc.send_c_store(f)
            code = int(status.Status) if status and "Status" in status else None
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                failed.append(f"{f}: {'no response' if code is None else f'0x{code:04X}'}")
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        raise PhantomError(f"--send: {len(failed)} of {len(files)} not stored: {failed[:3]}")
    print(f"sent {len(files)} DICOM file(s) to {aec}@{host}:{port}")


def add_command(sub: Any) -> None:
    """``dicom-node synth`` (registered through the ``dicom_node.commands`` entry point)."""
    p = sub.add_parser("synth", help="write synthetic angiography phantoms with ground truth")
    configure_parser(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synth", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
