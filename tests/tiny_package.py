"""A tiny, untrained model package in the real package format, for tests that need a
package folder the node loads (settings, metrics, status page) but not its accuracy.

`models/` ships only packages that pass the shipping gate (docs/generalization.md), so
tests do not depend on what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipelines.models.package import build, write_package

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "dsa_av": (
        "st_unet",
        {
            "widths": [4, 8, 16],
            "channels": ["artery", "vein", "ica"],
            "out_channels": 3,
            "max_side": 64,
            "tile": 48,
            "overlap": 16,
        },
    ),
    "dsa_ia": ("vss_net", {"widths": [4, 8, 16]}),
}


def tiny_package(folder: Path, pipeline: str, name: str, version: str = "0.0.1") -> Path:
    """Write an untrained package for ``pipeline`` (seeded weights) at ``folder``."""
    arch, config = CONFIGS[pipeline]
    torch.manual_seed(0)
    return write_package(
        folder,
        model=build(arch, config),
        name=name,
        version=version,
        architecture_name=arch,
        config=config,
        pipeline=pipeline,
        metrics={"note": "untrained, tests only"},
        data={"synthetic": True, "cases": 0},
        model_card="Untrained test package.",
        training_command="pytest",
        dataset_manifest_hash="0" * 64,
    )
