"""The content-addressed adapter store (DESIGN §4, §8).

Layout under ``LORRY_ADAPTER_STORE``::

    <store>/<digest>/adapter_config.json        0444
    <store>/<digest>/adapter_model.safetensors  0444   (directory 0555)
    <store>/.tmp/<random>/                      work areas of requests in progress

**Digest.** ``sha256`` of the ``sha256sum`` manifest of the two kept files, in name order —
exactly what coreutils prints, so anyone can recompute it::

    cd <adapter dir> && sha256sum adapter_config.json adapter_model.safetensors | sha256sum

i.e. ``sha256(f"{sha256(config)}  adapter_config.json\\n{sha256(weights)}  adapter_model.safetensors\\n")``
with lowercase hex digests. Files are stored byte for byte as received.

**Atomicity.** Every request works in its own directory under ``<store>/.tmp/`` (same file
system as the store, so ``rename`` is atomic); the work area is removed in ``finally`` whatever
happens. An adapter is staged there (files made 0444), validated and hashed, then renamed to
``<store>/<digest>``; a store directory therefore only ever appears complete. If
``<digest>`` already exists — identical content stored before, or a concurrent upload that won
the rename race — the staged copy is discarded with the work area and the existing directory
serves both. Store directories are never deleted here (garbage collection is a later feature,
DESIGN §8). Work areas left behind by a crashed process are swept once per process, when they
are older than :data:`STALE_WORK_AREA_S`.

Everything here is synchronous file I/O: callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

from control_plane.jobs.validation import CONFIG_FILE, KEPT_FILES, WEIGHTS_FILE, AdapterRejected

WORK_DIR = ".tmp"
CHUNK = 1 << 20
FILE_MODE = 0o444
DIR_MODE = 0o555
STALE_WORK_AREA_S = 24 * 3600.0
DIGEST_RE = re.compile(r"[0-9a-f]{64}")

logger = logging.getLogger("lorry.control_plane")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_digest(directory: Path) -> str:
    """The store digest of the two kept files in ``directory`` (see module docstring)."""
    manifest = "".join(f"{file_sha256(directory / name)}  {name}\n" for name in sorted(KEPT_FILES))
    return hashlib.sha256(manifest.encode()).hexdigest()


def copy_capped(source: BinaryIO, destination: Path, *, limit: int, what: str) -> int:
    """Copy a stream to a new file, refusing more than ``limit`` bytes while copying."""
    written = 0
    with destination.open("xb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise AdapterRejected(f"{what} exceeds {limit} bytes", code="adapter_too_large")
            out.write(chunk)
    return written


def force_remove(path: Path) -> None:
    """Remove a tree even where it was made read-only; never follows symlinks, never raises."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(mode):
            path.unlink()
            return
        # Top-down: each directory is listed (0555 allows it), then opened up for deletion.
        for directory, _dirnames, _filenames in os.walk(path):
            with contextlib.suppress(OSError):
                Path(directory).chmod(0o700)
        shutil.rmtree(path)
    except OSError:
        logger.warning("could not remove %s", path, exc_info=True)


@dataclass(frozen=True, slots=True)
class StagedAdapter:
    """A validated, hashed, read-only copy of an adapter inside a work area."""

    path: Path
    digest: str


class AdapterStore:
    _swept: ClassVar[set[Path]] = set()
    _sweep_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.work_root = self.root / WORK_DIR

    def path_for(self, digest: str) -> Path:
        if not DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a store digest: {digest!r}")
        return self.root / digest

    def contains(self, digest: str) -> bool:
        return self.path_for(digest).is_dir()

    def open_work_area(self) -> Path:
        """A private directory on the store's file system; pair with :meth:`close_work_area`."""
        self.work_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sweep_once()
        area = self.work_root / uuid.uuid4().hex
        area.mkdir(mode=0o700)
        return area

    def close_work_area(self, area: Path) -> None:
        if area.parent != self.work_root:
            raise ValueError(f"not a work area of this store: {area}")
        force_remove(area)

    @contextlib.contextmanager
    def work_area(self) -> Iterator[Path]:
        """A work area removed on exit, whatever happened."""
        area = self.open_work_area()
        try:
            yield area
        finally:
            self.close_work_area(area)

    def new_stage(self, area: Path) -> Path:
        """An empty directory in ``area`` to assemble one adapter's two files in."""
        stage = area / f"stage-{uuid.uuid4().hex[:12]}"
        stage.mkdir(mode=0o700)
        return stage

    def seal(self, stage: Path) -> StagedAdapter:
        """Make the staged files read-only (only the kept two may be there) and hash them."""
        present = sorted(entry.name for entry in os.scandir(stage))
        if present != sorted(KEPT_FILES):
            raise RuntimeError(f"a staged adapter must hold exactly {KEPT_FILES}, found {present}")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (stage / name).chmod(FILE_MODE)
        return StagedAdapter(path=stage, digest=adapter_digest(stage))

    def commit(self, staged: StagedAdapter) -> Path:
        """Rename a sealed adapter into ``<store>/<digest>``; identical content is stored once."""
        final = self.path_for(staged.digest)
        if final.is_dir():
            self._ensure_read_only(final)
            return final
        try:
            # Renaming into a new parent needs write permission on the directory itself, so it
            # becomes 0555 right after; its files are already 0444.
            staged.path.rename(final)
        except OSError as exc:
            # Lost the race to an identical concurrent upload: its directory is complete.
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
                self._ensure_read_only(final)
                return final
            raise
        final.chmod(DIR_MODE)
        return final

    @staticmethod
    def _ensure_read_only(final: Path) -> None:
        """Finish a rename whose chmod a crash interrupted (best effort: we may not own it)."""
        with contextlib.suppress(OSError):
            if final.stat().st_mode & 0o222:
                final.chmod(DIR_MODE)

    def _sweep_once(self) -> None:
        with self._sweep_lock:
            if self.root in AdapterStore._swept:
                return
            AdapterStore._swept.add(self.root)
        cutoff = time.time() - STALE_WORK_AREA_S
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.work_root):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        force_remove(Path(entry.path))


def listing(root: Path) -> dict[str, int]:
    """Every path under ``root`` (relative) with its permission bits; for tests and debugging."""
    result: dict[str, int] = {}
    if not root.exists():
        return result
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(directory) / name
            result[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return result
