"""Helpers for tests that tamper with distributed checkpoints (not a test module)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from emakit import checkpoint
from emakit.io import write_sealed_json


def data_folder(folder: Path) -> Path:
    """The folder holding the checkpoint's DCP files (named by its pointer)."""
    return checkpoint.read_checkpoint(folder)[0].data


def reseal(folder: Path) -> None:
    """Recompute every checksum in the pointer for the files as they are now, as the author
    of a crafted folder would: checksums catch accidents, the restricted loader the rest."""
    manifest = json.loads((folder / checkpoint.POINTER).read_bytes().split(b"\n", 1)[1])
    data = folder / manifest["data"]
    raw = (data / ".metadata").read_bytes()
    manifest["metadata"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    try:
        spans = checkpoint._spans(checkpoint._parse_metadata(raw, "x"))
        manifest["files"] = {f: checkpoint._checksum_file(data / f, s) for f, s in spans.items()}
    except ValueError:  # not metadata at all: the data files' checksums stay
        pass
    write_sealed_json(folder / checkpoint.POINTER, manifest, overwrite=True)
