"""Where prepared models and data live: ``$BILD_HOME`` (default ``~/.cache/bild``)."""

from __future__ import annotations

from pathlib import Path

from ..home import bild_home

__all__ = ["bild_home", "resolve_data", "resolve_model"]


def resolve_model(name: str) -> str:
    """A local folder, a model prepared under ``bild_home()/models``, or else a hub id unchanged."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    prepared = bild_home() / "models" / name
    if prepared.is_dir():
        return str(prepared)
    return name


def resolve_data(name: str) -> Path:
    """An existing JSONL file, or the prepared set ``bild_home()/data/<name>.jsonl``."""
    if Path(name).expanduser().is_file():
        return Path(name).expanduser()
    prepared = bild_home() / "data" / f"{name}.jsonl"
    if not prepared.is_file():
        raise FileNotFoundError(
            f"No data file {name!r} and no prepared set at {prepared}. "
            "Run `python scripts/prepare_data.py` to write the offline evaluation sets, "
            "or pass the path of an existing JSONL file."
        )
    return prepared
