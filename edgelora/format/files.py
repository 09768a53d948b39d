"""Files of a deployment folder: paths that stay inside it, regular files only, sizes and sha256 checked.

Every path a manifest names is relative (POSIX, no ``..``, not absolute) and resolves, symlinks followed,
to a regular file inside the folder. A path that leaves the folder is refused with the same message whether
or not its target exists, so errors reveal nothing about the rest of the disk. Files are opened
non-blocking and checked with ``fstat`` before a byte is read: a FIFO or a device in place of a delta is
refused at once instead of hanging the reader.

The manifest records ``{size, sha256}`` of every file in the folder (``FileEntry``). Small files (deltas,
W0, JSON) are checked against it whenever they are read; engines are size-checked at open and fully
hashed on request (:func:`verify_files`, ``Runtime.open(verify=True)``, ``edgelora verify DIR``).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DeploymentError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """What the manifest says one file is: its size in bytes and the sha256 of its bytes (hex)."""

    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def check_relative(value: Any, field: str, where: str) -> str:
    """A manifest path, checked without touching the disk: a non-empty relative POSIX path with no ``..``."""
    if not isinstance(value, str) or not value:
        raise DeploymentError(f"{where}: {field} must be a relative path string, got {_short(value)}; re-export")
    parts = PurePosixPath(value).parts
    if (value.startswith(("/", "\\")) or "\\" in value or "\x00" in value or re.match(r"^[A-Za-z]:", value)
            or ".." in parts or not parts or {".", ""} & set(value.split("/"))):
        raise DeploymentError(f"{where}: {field} = {_short(value)} is not a plain path inside the deployment "
                              "folder (absolute, '..', '.' or backslashes); re-export the folder")
    return value


def locate(folder: Path, rel: str, what: str) -> Path:
    """``folder/rel`` with symlinks resolved, refused unless it is a regular file inside ``folder``."""
    root = Path(os.path.realpath(folder))
    path = Path(os.path.realpath(root / rel))
    if path != root and root not in path.parents:
        raise DeploymentError(f"{folder / rel}: {what} resolves outside the deployment folder; refusing to read "
                              "it (re-export the folder, or replace the link with the file)")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DeploymentError(f"{folder / rel}: {what} is missing; re-export the folder") from None
    except OSError as exc:
        raise DeploymentError(f"{folder / rel}: cannot read {what} ({exc.strerror}); check its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeploymentError(f"{folder / rel}: {what} is not a regular file; re-export the folder")
    return path


@contextmanager
def open_regular(folder: Path, rel: str, what: str) -> Iterator[tuple[int, os.stat_result]]:
    """(file descriptor, its stat) of a regular file inside ``folder``, opened without blocking."""
    with open_path(locate(folder, rel, what), what, shown=folder / rel) as opened:
        yield opened


@contextmanager
def open_path(path: Path, what: str, shown: Path | None = None) -> Iterator[tuple[int, os.stat_result]]:
    """(file descriptor, its stat) of ``path``, which must be a regular file: opened non-blocking, so a FIFO
    in its place is refused at once instead of hanging, and checked with fstat after the open."""
    shown = shown or path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DeploymentError(f"{shown}: no such {what}; check the path") from None
    except OSError as exc:
        raise DeploymentError(f"{shown}: cannot open {what} ({exc.strerror}); check the file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeploymentError(f"{shown}: {what} is not a regular file; pass the file itself")
        yield fd, st
    finally:
        os.close(fd)


def read_fd(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _check_size(folder: Path, rel: str, what: str, got: int, entry: FileEntry | None) -> None:
    if entry is not None and got != entry.size:
        raise DeploymentError(f"{folder / rel}: {what} is {got} bytes, the manifest says {entry.size}: it was "
                              "changed or truncated after export; re-export the folder")


def _check_hash(folder: Path, rel: str, what: str, digest: str, entry: FileEntry | None) -> None:
    if entry is not None and digest != entry.sha256:
        raise DeploymentError(f"{folder / rel}: {what} does not match the sha256 in the manifest: it was changed "
                              "after export; re-export the folder")


def read_bytes(folder: Path, rel: str, what: str, entry: FileEntry | None, limit: int | None = None) -> bytes:
    """The whole file, checked against ``entry`` (size, then sha256) when given; ``limit``: refuse larger files."""
    with open_regular(folder, rel, what) as (fd, st):
        _check_size(folder, rel, what, st.st_size, entry)
        if limit is not None and st.st_size > limit:
            raise DeploymentError(f"{folder / rel}: {what} is {st.st_size} bytes, more than the {limit} this "
                                  "reader accepts; is it the right file?")
        data = read_fd(fd)
    _check_size(folder, rel, what, len(data), entry)
    _check_hash(folder, rel, what, hashlib.sha256(data).hexdigest(), entry)
    return data


def map_file(folder: Path, rel: str, what: str, entry: FileEntry | None) -> mmap.mmap | bytes:
    """A read-only memory map of the file (pages load on first use), checked against ``entry``: the hash is
    computed over the very pages that will be used."""
    with open_regular(folder, rel, what) as (fd, st):
        _check_size(folder, rel, what, st.st_size, entry)
        if st.st_size == 0:
            return b""
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    if entry is not None:
        _check_hash(folder, rel, what, hashlib.sha256(mapped).hexdigest(), entry)
    return mapped


def check_sizes(folder: Path, files: Mapping[str, FileEntry]) -> None:
    """Every file the manifest lists is a regular file inside the folder, of the recorded size (cheap: stat)."""
    for rel, entry in files.items():
        path = locate(folder, rel, "file")
        _check_size(folder, rel, "file", path.stat().st_size, entry)


def sha256_file(fd: int) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def verify_files(folder: Path, files: Mapping[str, FileEntry]) -> None:
    """Every listed file, read whole: size and sha256 as recorded (engines included; ~0.1 s per 180 MB here)."""
    for rel, entry in files.items():
        with open_regular(folder, rel, "file") as (fd, st):
            _check_size(folder, rel, "file", st.st_size, entry)
            _check_hash(folder, rel, "file", sha256_file(fd), entry)


def file_table(folder: Path, exclude_dirs: frozenset[str] = frozenset()) -> dict[str, FileEntry]:
    """``{relative path: FileEntry}`` of every regular file under ``folder`` but those in the top-level folders
    ``exclude_dirs`` (the exporter's side), sorted."""
    table: dict[str, FileEntry] = {}
    seen: dict[tuple[int, int], FileEntry] = {}  # hard links (a task engine's data is the base's) hashed once
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel.split("/")[0] in exclude_dirs or not path.is_file() or path.is_symlink():
            continue
        st = path.stat()
        if (st.st_dev, st.st_ino) not in seen:
            with open(path, "rb") as f:
                seen[(st.st_dev, st.st_ino)] = FileEntry(st.st_size, sha256_file(f.fileno()))
        table[rel] = seen[(st.st_dev, st.st_ino)]
    return table


def parse_file_entry(value: Any, field: str, where: str) -> FileEntry:
    if not (isinstance(value, dict) and set(value) == {"size", "sha256"}):
        raise DeploymentError(f"{where}: {field} must be {{\"size\": bytes, \"sha256\": hex}}, got {_short(value)}; "
                              "re-export")
    size, digest = value["size"], value["sha256"]
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise DeploymentError(f"{where}: {field}.size = {_short(size)} is not a byte count; re-export")
    if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise DeploymentError(f"{where}: {field}.sha256 = {_short(digest)} is not a sha256 hex digest; re-export")
    return FileEntry(size, digest)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
