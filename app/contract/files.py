"""Locates the contract files: schemas/*.avsc and topics/topics.yaml (repo root, or inside the wheel)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_HERE = Path(__file__).resolve().parent


@cache
def contract_dir(name: str) -> Path:
    """The folder `schemas` or `topics`, from a source checkout or an installed wheel."""
    for candidate in (_HERE.parent.parent / name, _HERE.parent / "_contract" / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"contract folder {name!r} not found next to {_HERE}")
