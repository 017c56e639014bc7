"""Where bild keeps what it prepares and measures: ``$BILD_HOME`` (default ``~/.cache/bild``)."""

from __future__ import annotations

import os
from pathlib import Path


def bild_home() -> Path:
    """The root folder for prepared models, data and measured costs: env ``BILD_HOME`` or ``~/.cache/bild``."""
    return Path(os.environ.get("BILD_HOME") or Path.home() / ".cache" / "bild").expanduser()
