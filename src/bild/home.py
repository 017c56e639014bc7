"""Where bild keeps what it prepares and measures: ``$BILD_HOME`` (default ``~/.cache/bild``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def bild_home() -> Path:
    """The root folder for prepared models, data and measured costs: env ``BILD_HOME`` or ``~/.cache/bild``."""
    return Path(os.environ.get("BILD_HOME") or Path.home() / ".cache" / "bild").expanduser()


def fit_file(kind: str, key: dict) -> Path:
    """``$BILD_HOME/fit/<kind>-<digest>.json``: where a measurement made for ``key`` (models, machine) is stored."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return bild_home() / "fit" / f"{kind}-{digest}.json"


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON in one step (a temporary file renamed): processes sharing the folder (torchrun,
    parallel tests) read either nothing or a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(f.name, path)
