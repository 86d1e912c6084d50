"""Dataset versions: a name + version is written once, and never rewritten silently.

A dataset folder holds one version (``manifest.json`` names it). A build whose
result differs from what the folder already holds is refused with what would
change (cases added, removed, changed, split moves) and the command to write it
as a new version instead; ``--force`` replaces it and says what changed. A new
version built with ``--previous DIR`` keeps every earlier patient in the split
the previous version gave it (:func:`carried_splits`), and its manifest lists
the changes against that version (``changes``, hashed with the rest).

Everything is first written to a staging folder next to the target and moved
into place only once the comparison allows it (:func:`commit`), so a refused
build leaves the existing version untouched.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["carried_splits", "commit", "describe", "diff", "existing", "staging", "suggest"]


class VersionError(Exception):
    """A build that would rewrite an existing dataset version (``DatasetError`` subclasses it)."""


def existing(root: Path) -> dict[str, Any] | None:
    """The manifest a dataset folder already holds, or None."""
    path = Path(root) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def staging(root: Path) -> Path:
    """An empty staging folder beside ``root`` (same file system: the final move is a rename)."""
    tmp = root.parent / f".{root.name}.building"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def carried_splits(previous: Mapping[str, Any] | None) -> dict[str, str]:
    """Patient pseudonym -> split of every patient of the previous version."""
    if not previous:
        return {}
    return {c["patient"]: c["split"] for c in previous.get("cases", [])}


def diff(old: Mapping[str, Any], new: Mapping[str, Any], old_sha256: str) -> dict[str, Any]:
    """What changes from ``old`` to ``new``, case by case (ids are stable for one pseudonym
    map): added, removed, changed content (pixels, labels, kind) and split moves."""
    before = {c["id"]: c for c in old.get("cases", [])}
    after = {c["id"]: c for c in new.get("cases", [])}
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    common = sorted(set(before) & set(after))
    changed = [
        i
        for i in common
        if any(before[i].get(k) != after[i].get(k) for k in ("sha256", "kind", "roles", "geometry"))
    ]
    moves = [
        {"id": i, "from": before[i]["split"], "to": after[i]["split"]}
        for i in common
        if before[i]["split"] != after[i]["split"]
    ]

    def by_split(ids: list[str], cases: Mapping[str, Any]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in ids:
            out[cases[i]["split"]] = out.get(cases[i]["split"], 0) + 1
        return dict(sorted(out.items()))

    return {
        "previous": {
            "name": old.get("name"),
            "version": old.get("version"),
            "manifest_sha256": old_sha256,
        },
        "added": added,
        "removed": removed,
        "changed": changed,
        "split_moves": moves,
        "counts": {
            "added": len(added),
            "removed": len(removed),
            "changed": len(changed),
            "unchanged": len(common) - len(changed),
            "split_moves": len(moves),
            "added_by_split": by_split(added, after),
            "removed_by_split": by_split(removed, before),
        },
    }


def describe(changes: Mapping[str, Any]) -> str:
    """One line: what a diff says."""
    c = changes["counts"]

    def splits(d: Mapping[str, int]) -> str:
        return f" ({', '.join(f'{k} {v}' for k, v in d.items())})" if d else ""

    parts = [
        f"{c['added']} case(s) added{splits(c['added_by_split'])}",
        f"{c['removed']} removed{splits(c['removed_by_split'])}",
        f"{c['changed']} changed",
        f"{c['unchanged']} unchanged",
        f"{c['split_moves']} moved to another split",
    ]
    return ", ".join(parts)


def suggest(root: Path, version: str) -> tuple[Path, str]:
    """A folder and version for the next version: ``data/x-1`` -> ``data/x-2``, version 2."""
    m = re.fullmatch(r"(\d+)", version)
    nxt = str(int(m.group(1)) + 1) if m else f"{version}.1"
    name = root.name
    tail = re.search(r"(\d+)$", name)
    folder = name[: tail.start()] + nxt if tail else f"{name}-v{nxt}"
    return root.with_name(folder), nxt


def commit(
    root: Path,
    built: Path,
    manifest: Mapping[str, Any],
    digest: str,
    force: bool,
    progress: Callable[[str], None],
) -> None:
    """Move the staged build ``built`` to ``root`` unless that rewrites the version ``root``
    holds (then VersionError with what would change, or, with ``force``, replace it and say
    what changed). A build equal to the existing one leaves the files as they are."""
    from training.dataset import manifest_hash

    old = existing(root)
    if old is None:  # a new folder, or one without a dataset: the build's entries go in
        root.mkdir(parents=True, exist_ok=True)
        for entry in sorted(built.iterdir()):
            there = root / entry.name
            if there.is_dir():
                shutil.rmtree(there)
            entry.replace(there)
        built.rmdir()
        return
    old_sha = manifest_hash(root)
    if old_sha == digest:
        # Same content: keep the files, record the new build key.
        shutil.copy2(built / "build.json", root / "build.json")
        shutil.rmtree(built)
        progress(f"dataset {root}: content unchanged (sha256 {digest[:16]})")
        return
    changes = diff(old, manifest, old_sha)
    what = describe(changes)
    if not force:
        shutil.rmtree(built)
        folder, version = suggest(root, str(old.get("version", "1")))
        raise VersionError(
            f"{root} holds dataset {old.get('name')!r} version {old.get('version')} (manifest "
            f"sha256 {old_sha[:16]}); this build would change it: {what}. A dataset version is "
            f"never rewritten: build it as a new version (--out {folder} --version {version} "
            f"--previous {root}; every earlier patient keeps its split), or give --force to "
            "replace this one"
        )
    progress(f"--force: replacing {root} (version {old.get('version')}, {old_sha[:16]}): {what}")
    old_dir = root.parent / f".{root.name}.replaced"
    if old_dir.exists():
        shutil.rmtree(old_dir)
    root.rename(old_dir)
    built.rename(root)
    shutil.rmtree(old_dir)
