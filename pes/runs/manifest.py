"""Checksums of a checkpoint's files: written last, checked before a restore.

``DIR/<step>/pes_manifest.json`` lists every file orbax wrote for the checkpoint of ``step``
(relative path, size in bytes, SHA-256), written atomically (a temporary file renamed into
place) once orbax has finished and renamed the checkpoint folder. :func:`verify` recomputes
them: a missing, truncated or altered file (damaged metadata, a flipped bit in array data) is
found before anything is restored, so a damaged checkpoint is never loaded as data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "pes_manifest.json"
FORMAT = 1


class CheckpointDamaged(ValueError):
    """A checkpoint's files do not match its manifest, or it cannot be read. ``step``: which."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(f".{MANIFEST}"))


def write(folder: str | os.PathLike) -> Path:
    """Record the size and SHA-256 of every file below ``folder``; returns the manifest path.
    The file is fsynced and renamed into place, so it exists only when complete."""
    folder = Path(folder)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
               for p in _files(folder)}
    target = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "files": entries}, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)
    return target


def has_manifest(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def verify(folder: str | os.PathLike, step: int | None = None) -> None:
    """Raise CheckpointDamaged naming the first file that is missing, has another size or
    another SHA-256 than the manifest says (or the manifest itself unreadable)."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"its checksum manifest {path} is unreadable ({e})",
                                step) from None
    for rel, want in sorted(files.items()):
        file = folder / rel
        if not file.is_file():
            raise CheckpointDamaged(f"{file} is missing", step)
        size = file.stat().st_size
        if size != want.get("size"):
            raise CheckpointDamaged(f"{file} has {size} bytes, {want.get('size')} were written "
                                    "(truncated or altered)", step)
        if _sha256(file) != want.get("sha256"):
            raise CheckpointDamaged(f"{file} does not match its SHA-256 (altered on disk)", step)
