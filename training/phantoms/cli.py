"""``dicom-node synth``: write phantom runs with their truth to a folder.

    dicom-node synth dsa --output out/ --count 10 --seed 100 --size 512 --frames 20
    dicom-node synth dsa --output out/ --native --encoding jpeg-lossless --seg
    dicom-node synth coronary --output out/ --frames 45
    dicom-node synth rotational --output out/ --size 256 --seg
    dicom-node synth dsa --output out/ --count 100 --randomise      # training data
    dicom-node synth coronary --output out/ --randomise --size 768x1024

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
    randomise = bool(getattr(args, "randomise", False))
    size = args.size
    if size is None and not (randomise and args.kind != "rotational"):
        size = DEFAULT_SIZE[args.kind]
    frames = args.frames or DEFAULT_FRAMES.get(args.kind)
    total = 0
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
        print(
            f"{args.kind} seed {seed}: {len(files)} files in {files[0].parent} ({time.perf_counter() - start:.1f} s)"
        )
    print(f"wrote {total} files for {args.count} run(s) to {args.output}")
    return 0


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
