"""Find dcmtk's command-line tools (``storescu``, ``storescp``, ``echoscu``).

pynetdicom 3 installs Python console scripts with the same names and other
options; with a virtual environment on ``PATH`` they come first. dcmtk's tools
are compiled programs, so the first executable on ``PATH`` that is not a
script (``#!``) is the dcmtk one.
"""

from __future__ import annotations

import os


def find(tool: str) -> str | None:
    """Path of dcmtk's ``tool``, or None when dcmtk is not installed."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", tool)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        with open(path, "rb") as handle:
            if handle.read(2) == b"#!":
                continue
        return path
    return None
