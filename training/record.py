"""What a training run was, so that it can be run again: the record in ``run.json``.

The record holds the full command (with the ``torchrun`` launcher and the world
size when there was one), the resolved configuration (``config.toml`` beside it),
the dataset (path, name, version, manifest hash), the code (git commit, and
whether the working tree had changes the commit does not hold), the versions of
Python, torch, numpy, highdicom and pydicom, and the device. ``reproduce`` is
the command that trains the same run again from those: the resolved
configuration, the same dataset, a fresh work directory (a CPU run reproduces
bit for bit; tested). Every part of a run split by ``--max-minutes`` is listed
in ``parts``. ``model.pt`` carries the record, and ``python -m training
package`` copies it into the package (``training_record.json`` and the model
card's Reproduce section).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "numpy", "highdicom", "pydicom", "scipy", "scikit-image")


def launcher(environ: Mapping[str, str] | None = None) -> list[str]:
    """``torchrun ...`` as it started this process (empty when it did not)."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return []
    nproc = env.get("LOCAL_WORLD_SIZE", "1")
    nnodes = env.get("GROUP_WORLD_SIZE", "1")
    if nnodes == "1":
        return ["torchrun", "--standalone", "--nproc-per-node", nproc]
    return [
        "torchrun",
        "--nnodes",
        nnodes,
        "--nproc-per-node",
        nproc,
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "HOST:PORT",  # the rendezvous host of the run (not kept by torchrun's environment)
    ]


def command(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """The command line of this process, with its launcher."""
    prefix = launcher(environ)
    head = [*prefix, "-m", "training"] if prefix else ["python", "-m", "training"]
    return shlex.join([*head, *argv])


def reproduce(
    subcommand: Sequence[str], workdir: str | Path, config_file: str | Path, environ=None
) -> str:
    """The command that trains the run again: ``subcommand`` (what selects the data) with
    the resolved configuration, into a fresh work directory."""
    argv = [*subcommand, "--workdir", f"{workdir}-reproduced", "--config-file", str(config_file)]
    return command(argv, environ)


def code_version(root: Path = REPO) -> dict[str, Any]:
    """The git commit of the code, and whether tracked files differ from it."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.rstrip("\n") if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "note": f"{root} is not a git checkout"}
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "training", "pipelines")
    return {
        "commit": commit,
        # Uncommitted changes to the code that trains and evaluates: the commit alone
        # does not reproduce the run then.
        "uncommitted_changes": bool(changed),
        "changed_files": sorted(line[3:] for line in (changed or "").splitlines()),
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "cuda": torch.version.cuda,
            "count": torch.cuda.device_count(),
        }
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
