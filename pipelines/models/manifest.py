"""What a model package folder must hold, checked without torch: its files, its
``package.json`` (format, pipeline) and the SHA-256 of its weights.

``pipelines.models.package`` reads packages through these checks before it builds a
network; the node's settings make the same checks when they load (``[models]``), so
that a package that cannot be used stops the node's start, naming it, instead of
failing every job of its pipeline while the node runs (before 2026-12-07 only the
package's declared pipeline was checked at the start).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipelines.base import PipelineError

FORMAT_VERSION = 1
REQUIRED_FILES = ("package.json", "weights.pt", "metrics.json", "data.json", "MODEL_CARD.md")
KEYS = ("name", "version", "architecture", "config", "pipeline", "format")


def read_manifest(
    path: str | Path, pipeline: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``package.json``, ``metrics.json`` and ``data.json`` of the package at ``path``;
    ``PipelineError`` when a file is missing, a JSON file cannot be read, a key is
    missing, the format is not this one, or (``pipeline`` given) the package is for
    another pipeline."""
    root = Path(path)
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise PipelineError(f"model package {root} is incomplete: missing {', '.join(missing)}")
    try:
        meta, metrics, data = (
            json.loads((root / name).read_text())
            for name in ("package.json", "metrics.json", "data.json")
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"model package {root}: cannot be read ({exc})") from exc
    if not isinstance(meta, dict):
        raise PipelineError(f"model package {root}: package.json is not a JSON object")
    for key in KEYS:
        if key not in meta:
            raise PipelineError(f"model package {root}: package.json lacks {key!r}")
    if meta["format"] != FORMAT_VERSION:
        raise PipelineError(
            f"model package {root}: format {meta['format']} not supported (expected {FORMAT_VERSION})"
        )
    if pipeline is not None and meta["pipeline"] != pipeline:
        raise PipelineError(
            f"model package {root} is for pipeline {meta['pipeline']!r}, not {pipeline!r}"
        )
    return meta, metrics, data


def verified_weights(root: str | Path, sha256: str) -> bytes:
    """The bytes of ``weights.pt``, checked against the ``weights_sha256`` the package
    declares."""
    root = Path(root)
    if not sha256:
        raise PipelineError(f"model package {root}: package.json lacks weights_sha256")
    try:
        data = (root / "weights.pt").read_bytes()
    except OSError as exc:
        raise PipelineError(f"model package {root}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise PipelineError(
            f"model package {root}: weights.pt has SHA-256 {digest[:16]}..., "
            f"package.json declares {sha256[:16]}... (corrupt or replaced weights)"
        )
    return data
