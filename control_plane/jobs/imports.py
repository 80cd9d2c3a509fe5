"""Importing a fine-tuning output directory from the server's file system (DESIGN §4 "Jobs").

The path must be absolute and, once every symlink is followed (``Path.resolve``), lie inside one
of ``LORRY_IMPORT_ROOTS``; so must every adapter directory and kept file found in it (a symlink
inside a root pointing outside is refused). A path outside the roots is refused the same way
whether it exists or not, so the API is no oracle for the rest of the file system.

Layout (Hugging Face Trainer / PEFT output)::

    <dir>/adapter_config.json, adapter_model.safetensors      the final adapter (optional)
    <dir>/checkpoint-<step>/adapter_config.json, …            checkpoints (optional)

Anything else (optimizer.pt, rng_state.pth, trainer_state.json, README.md…) is ignored and never
read; a directory whose adapter has only pickled weights is refused (``unsafe_weights``).
Kept files are opened without following a final symlink and must be regular files; they are
copied into the store's work area with size caps, and only the copies are validated and stored.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from control_plane.jobs.store import copy_capped
from control_plane.jobs.validation import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    AdapterRejected,
    check_file_policy,
)
from lorry.errors import InvalidRequest

CHECKPOINT_DIR = re.compile(r"checkpoint-(\d{1,10})")
MAX_STEP = 2**31 - 1
MAX_CHECKPOINTS = 1000
ADAPTER_MARKERS = re.compile(r"adapter_(config\.json|model\..+)")


def not_allowed(path: str, why: str = "is not inside an import root (LORRY_IMPORT_ROOTS)") -> InvalidRequest:
    return InvalidRequest(f"Import path '{path[:300]}' {why}", code="import_path_not_allowed")


@dataclass(frozen=True, slots=True)
class SourceAdapter:
    """One adapter directory found by an import: where its two kept files are."""

    label: str
    """``final`` or ``checkpoint-<step>``: names it in error messages."""
    step: int | None
    config: Path
    weights: Path


@dataclass(frozen=True, slots=True)
class ImportPlan:
    directory: Path
    final: SourceAdapter | None
    checkpoints: tuple[SourceAdapter, ...]

    @property
    def adapters(self) -> tuple[SourceAdapter, ...]:
        return ((self.final,) if self.final else ()) + self.checkpoints


class _Roots:
    def __init__(self, roots: Sequence[Path], shown: str) -> None:
        self.shown = shown
        self.roots = []
        for root in roots:
            try:
                self.roots.append(Path(root).resolve(strict=True))
            except OSError:
                continue

    def resolve(self, path: Path, inner: str = "") -> Path:
        """``path`` with every symlink followed, refused unless inside a root; must exist.

        ``inner`` names an entry of the imported directory in messages (never its target)."""
        shown = f"{self.shown.rstrip('/')}/{inner}" if inner else self.shown
        try:
            candidate = path.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python 3.11
            raise not_allowed(shown, "cannot be resolved") from exc
        if not any(candidate == root or candidate.is_relative_to(root) for root in self.roots):
            raise not_allowed(shown)
        try:
            return path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise InvalidRequest(
                f"Import path '{shown[:300]}' does not exist", code="import_path_not_found"
            ) from exc


def plan_import(path: str, roots: Sequence[Path]) -> ImportPlan:
    """Find the adapters of an output directory; reads directory listings only."""
    if "\x00" in path or not Path(path).is_absolute():
        raise not_allowed(path, "must be an absolute path")
    checked = _Roots(roots, path)
    if not checked.roots:
        raise not_allowed(path, "cannot be imported: no import roots are configured (LORRY_IMPORT_ROOTS)")
    directory = checked.resolve(Path(path))
    if not directory.is_dir():
        raise InvalidRequest(f"Import path '{path[:300]}' is not a directory", code="import_path_not_found")

    names = _list(directory)
    final = None
    if any(ADAPTER_MARKERS.fullmatch(name) for name in names):
        final = _source(checked, directory, names, "final", None)
    checkpoints = []
    for name in sorted(names):
        match = CHECKPOINT_DIR.fullmatch(name)
        if match is None:
            continue
        step = int(match[1])
        if step > MAX_STEP:
            raise InvalidRequest(f"Checkpoint directory '{name}' has a step over {MAX_STEP}")
        sub = checked.resolve(directory / name, name)
        if not sub.is_dir():
            continue
        checkpoints.append(_source(checked, sub, _list(sub), name, step))
        if len(checkpoints) > MAX_CHECKPOINTS:
            raise InvalidRequest(f"More than {MAX_CHECKPOINTS} checkpoint directories")
    if final is None and not checkpoints:
        raise AdapterRejected(
            f"No adapter in '{path[:300]}': expected {CONFIG_FILE} and {WEIGHTS_FILE} at its root "
            "or in checkpoint-<step>/ subdirectories"
        )
    checkpoints.sort(key=lambda source: source.step or 0)
    return ImportPlan(directory=directory, final=final, checkpoints=tuple(checkpoints))


def _list(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [entry.name for entry in entries]
    except OSError as exc:
        raise InvalidRequest(
            f"Directory '{directory.name}' cannot be read", code="import_path_not_found"
        ) from exc


def _source(roots: _Roots, directory: Path, names: list[str], label: str, step: int | None) -> SourceAdapter:
    check_file_policy(names, label)
    inner = "" if step is None else f"{label}/"
    return SourceAdapter(
        label=label,
        step=step,
        config=roots.resolve(directory / CONFIG_FILE, inner + CONFIG_FILE),
        weights=roots.resolve(directory / WEIGHTS_FILE, inner + WEIGHTS_FILE),
    )


def copy_source(source: SourceAdapter, stage: Path, *, max_weights_bytes: int) -> None:
    """Copy one adapter's kept files into an (empty) staging directory, capped while copying."""
    for origin, name, limit in (
        (source.config, CONFIG_FILE, MAX_CONFIG_BYTES),
        (source.weights, WEIGHTS_FILE, max_weights_bytes),
    ):
        what = f"{source.label}: {name}"
        try:
            fd = os.open(origin, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise AdapterRejected(f"{what} cannot be opened") from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise AdapterRejected(f"{what} is not a regular file")
            if info.st_size > limit:
                raise AdapterRejected(f"{what} exceeds {limit} bytes", code="adapter_too_large")
            copy_capped(handle, stage / name, limit=limit, what=what)
