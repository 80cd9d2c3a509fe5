"""Receiving an adapter archive and taking the adapter out of it, safely.

An upload body is a ``tar.gz`` (``application/gzip``) or a ``zip`` (``application/zip``) holding
one adapter, either at the archive root or inside its single top-level directory. The body is
streamed to a file in the request's work area with the size cap enforced while receiving.

Every member is checked before anything is used, and the whole archive is refused with 400
``unsafe_archive`` (Lorry POLICY) on: absolute names, ``..`` components, backslashes or NUL in
names, symlinks, hard links, devices, FIFOs, sparse members, duplicate names, encrypted zip
members, more than :data:`MAX_MEMBERS` members, or a total uncompressed size over the limit
(``LORRY_MAX_UPLOAD_BYTES``: a zip bomb). Member names never become file system paths: only the
two kept files are extracted, into fixed names, and their bytes are counted as they are
decompressed (zip headers can lie about sizes). A body that is not a readable archive of its
declared type is 400 ``invalid_archive``.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import anyio

from control_plane.jobs.validation import (
    CONFIG_FILE,
    KEPT_FILES,
    WEIGHTS_FILE,
    AdapterRejected,
    check_file_policy,
)
from lorry.errors import PayloadTooLarge, UnsupportedMediaType

ArchiveKind = Literal["tar.gz", "zip"]

CONTENT_TYPES: dict[str, ArchiveKind] = {
    "application/gzip": "tar.gz",
    "application/x-gzip": "tar.gz",
    "application/x-tar+gzip": "tar.gz",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
}
MAX_MEMBERS = 10_000
CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


def archive_kind(content_type: str | None) -> ArchiveKind:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    kind = CONTENT_TYPES.get(media_type)
    if kind is None:
        raise UnsupportedMediaType(
            "Upload the adapter as a raw application/gzip (tar.gz) or application/zip body"
        )
    return kind


async def receive(chunks: AsyncIterable[bytes], destination: Path, *, limit: int) -> int:
    """Write a request body to ``destination``, refusing more than ``limit`` bytes (413)."""
    received = 0
    pending: list[bytes] = []
    pending_size = 0
    async with await anyio.open_file(destination, "xb") as out:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= CHUNK:
                await out.write(b"".join(pending))
                pending, pending_size = [], 0
        if pending:
            await out.write(b"".join(pending))
    return received


def unsafe(message: str) -> AdapterRejected:
    return AdapterRejected(message, code="unsafe_archive")


def invalid(message: str) -> AdapterRejected:
    return AdapterRejected(message, code="invalid_archive")


def member_parts(name: str) -> tuple[str, ...]:
    """The normalised components of a member name; refuses anything that could escape."""
    shown = name[:120]
    if "\x00" in name or "\\" in name:
        raise unsafe(f"archive member '{shown!r}' has a backslash or NUL in its name")
    if name.startswith("/") or _DRIVE.match(name):
        raise unsafe(f"archive member '{shown}' has an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise unsafe(f"archive member '{shown}' has a '..' component")
    return parts


@dataclass
class _Scan:
    limit: int
    destination: Path
    members: int = 0
    total: int = 0
    extracted: int = 0
    files: dict[tuple[str, ...], Path | None] = field(default_factory=dict)
    directories: set[tuple[str, ...]] = field(default_factory=set)

    def directory(self, parts: tuple[str, ...]) -> None:
        self._count()
        if parts:
            self.directories.add(parts)

    def file(self, parts: tuple[str, ...], size: int) -> None:
        self._count()
        if not parts:
            raise unsafe("an archive member has no name")
        if parts in self.files:
            raise unsafe(f"archive member '{'/'.join(parts)}' appears twice")
        self.files[parts] = None
        self.total += size
        if self.total > self.limit:
            raise unsafe(f"the archive expands to more than {self.limit} bytes")

    def _count(self) -> None:
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise unsafe(f"the archive has more than {MAX_MEMBERS} members")

    def wanted(self, parts: tuple[str, ...]) -> bool:
        return len(parts) <= 2 and parts[-1] in KEPT_FILES

    def extract(self, parts: tuple[str, ...], source: IO[bytes], declared: int) -> Path:
        """Copy one kept file out, counting real bytes against its declared size and the limit."""
        self.extracted += 1
        target = self.destination / f"member-{self.extracted}"
        written = 0
        budget = self.limit - (self.total - declared)
        with target.open("xb") as out:
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > declared or written > budget:
                    raise unsafe(f"archive member '{'/'.join(parts)}' is larger than its header says")
                out.write(chunk)
        if written != declared:
            raise invalid(f"archive member '{'/'.join(parts)}' is truncated")
        return target


def _scan_tar(archive: Path, scan: _Scan) -> None:
    with archive.open("rb") as raw:
        if raw.read(2) != b"\x1f\x8b":
            raise invalid("the body is not gzip data")
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                parts = member_parts(member.name)
                shown = "/".join(parts) or member.name[:120]
                if member.issym() or member.islnk():
                    raise unsafe(f"archive member '{shown}' is a link")
                if member.isdev():
                    raise unsafe(f"archive member '{shown}' is a device or FIFO")
                if member.issparse():
                    raise unsafe(f"archive member '{shown}' is a sparse file")
                if member.isdir():
                    scan.directory(parts)
                    continue
                if not member.isreg():
                    raise unsafe(f"archive member '{shown}' has an unsupported type")
                scan.file(parts, member.size)
                if scan.wanted(parts):
                    source = tar.extractfile(member)
                    if source is None:
                        raise invalid(f"archive member '{shown}' cannot be read")
                    scan.files[parts] = scan.extract(parts, source, member.size)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise invalid(f"the body is not a readable tar.gz archive ({type(exc).__name__})") from exc


_UNSAFE_ZIP_TYPES = {
    stat.S_IFLNK: "a link",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def _scan_zip(archive: Path, scan: _Scan) -> None:
    try:
        with zipfile.ZipFile(archive) as zipped:
            infos = zipped.infolist()
            # Everything is checked from the central directory before a byte is inflated.
            planned: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
            for info in infos:
                parts = member_parts(info.filename)
                shown = "/".join(parts) or info.filename[:120]
                unix_type = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
                if unix_type in _UNSAFE_ZIP_TYPES:
                    raise unsafe(f"archive member '{shown}' is {_UNSAFE_ZIP_TYPES[unix_type]}")
                if info.flag_bits & 0x1:
                    raise unsafe(f"archive member '{shown}' is encrypted")
                if info.is_dir() or unix_type == stat.S_IFDIR:
                    scan.directory(parts)
                    continue
                scan.file(parts, info.file_size)
                if scan.wanted(parts):
                    planned.append((parts, info))
            for parts, info in planned:
                with zipped.open(info) as source:
                    scan.files[parts] = scan.extract(parts, source, info.file_size)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        NotImplementedError,
        EOFError,
        zlib.error,
        OSError,
    ) as exc:
        raise invalid(f"the body is not a readable zip archive ({type(exc).__name__})") from exc


@dataclass(frozen=True, slots=True)
class ExtractedAdapter:
    config: Path
    weights: Path


def extract_adapter(archive: Path, kind: ArchiveKind, work: Path, *, limit: int) -> ExtractedAdapter:
    """Check every member of ``archive`` and extract the adapter's two kept files into ``work``."""
    if archive.stat().st_size == 0:
        raise invalid("the body is empty")
    destination = work / "members"
    destination.mkdir(mode=0o700)
    scan = _Scan(limit=limit, destination=destination)
    if kind == "tar.gz":
        _scan_tar(archive, scan)
    else:
        _scan_zip(archive, scan)

    # Finder's zip adds __MACOSX/ and .DS_Store next to the real content: not a second directory.
    tops = {parts[0] for parts in scan.files} | {parts[0] for parts in scan.directories}
    tops -= {"__MACOSX", ".DS_Store"}
    root_names = {parts[0] for parts in scan.files if len(parts) == 1} - {".DS_Store"}
    if root_names & set(KEPT_FILES) or not scan.files:
        prefix: tuple[str, ...] = ()
    elif len(tops) == 1 and not root_names:
        prefix = (next(iter(tops)),)
    else:
        raise AdapterRejected(
            f"{CONFIG_FILE} must be at the archive root or inside its single top-level directory"
        )
    level = {parts[-1]: path for parts, path in scan.files.items() if parts[:-1] == prefix}
    check_file_policy(level, "the archive")
    config, weights = level.get(CONFIG_FILE), level.get(WEIGHTS_FILE)
    assert config is not None and weights is not None  # extracted: kept names at depth <= 2
    return ExtractedAdapter(config=config, weights=weights)
