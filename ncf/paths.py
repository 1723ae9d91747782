"""Output-location checks shared by fit, export and score (torch-free, so batch/ can use it)."""

from __future__ import annotations

import os
from pathlib import Path

from ncf.errors import NcfError


def check_writable_location(path: Path, what: str | None = None) -> None:
    """NcfError before any long work if `path` could not be created: its nearest existing
    ancestor is a file, or a directory without write permission."""
    what = what or str(path)
    parent = Path(path).absolute().parent
    for anc in (parent, *parent.parents):
        if anc.exists():
            if not anc.is_dir():
                raise NcfError(f"cannot write {what}: {anc} is a file, not a directory")
            if not os.access(anc, os.W_OK | os.X_OK):
                raise NcfError(f"cannot write {what}: no write permission in {anc}")
            return
