"""The build cache: a plain folder of cells, each under a name made of its kind and the sha256 of every input that
can change what it holds. A CI cache step saves and restores the folder as it is.

A cell is written in a locked temporary folder beside its final name and renamed into place in one step, so a
cell folder that exists is complete: a build killed mid-cell leaves an unlocked temporary folder that the next
build removes, never a half-written cell under a real name. Two builds writing the same cell at once each write
their own temporary folder; the first rename wins and the other build uses the winner's cell (same key, same
inputs).

The folder is untrusted storage (in CI, a store every run restores from and saves to): whoever can write it can
also rewrite a hash kept beside a cell. So, as binary caches do (Nix signs its store paths with a key its clients
trust), a build that holds a key (``EDGELORA_CACHE_KEY``, a CI secret) signs each cell it builds: an HMAC-SHA256
over the cell's canonical listing (kind, key, every file's path, size and sha256, its record). A cell read back
must carry a valid signature under that key, else it is rebuilt; without a key nothing is signed and the build
relies on what it re-derives (``rederive.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EdgeloraError
from ..format.files import sha256_file
from ..fsutil import atomic_output_dir

CELL_RECORD = "cell.json"  # written last into every cell
SIGNATURE = "cell.sig"  # HMAC-SHA256 of the cell's listing, hex, beside the record (written by the build)
KEY_ENV = "EDGELORA_CACHE_KEY"
LISTING_FORMAT = "edgelora cache cell 1"


def signing_key() -> bytes | None:
    """The build's cache key, from ``EDGELORA_CACHE_KEY``; None when unset or empty (a CI run without the secret,
    such as a pull request from a fork, builds without signing)."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode() if value else None


def cell_listing(folder: Path, kind: str, key: str) -> bytes:
    """What a signature covers: the cell's kind and key, every file's relative path, size and sha256 (the
    signature file aside), and its record as canonical JSON. Raises ValueError for what no build writes into a
    cell (a link, a special file, an unreadable record)."""
    lines = [LISTING_FORMAT, f"kind {kind}", f"key {key}"]
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel == SIGNATURE or (p.is_dir() and not p.is_symlink()):
            continue
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"{rel} is not a regular file")
        lines.append(f"file {json.dumps(rel)} {p.stat().st_size} {file_sha256(p)}")
    record = json.loads((folder / CELL_RECORD).read_text(encoding="utf-8"))
    lines.append("record " + json.dumps(record, sort_keys=True, separators=(",", ":")))
    return "\n".join(lines).encode()


def sign_listing(secret: bytes, listing: bytes) -> str:
    return hmac.new(secret, listing, hashlib.sha256).hexdigest()


def digest(*parts: Any) -> str:
    """sha256 of the canonical JSON of ``parts`` (with the edgelora version: a new version rebuilds)."""
    text = json.dumps([__version__, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return sha256_file(fd)
    finally:
        os.close(fd)


def folder_sha256(folder: Path, names: Iterable[str] | None = None) -> str:
    """sha256 over the relative names and bytes of every file in ``folder`` (or of ``names`` in it)."""
    h = hashlib.sha256()
    files = sorted(folder / n for n in names) if names is not None else sorted(
        p for p in folder.rglob("*") if p.is_file())
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cells = root / "cells"

    def path(self, kind: str, key: str) -> Path:
        return self.cells / f"{kind}-{key[:32]}"

    def has(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / CELL_RECORD).is_file()

    def record(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.path(kind, key) / CELL_RECORD).read_text(encoding="utf-8"))

    def sign(self, kind: str, key: str, secret: bytes) -> None:
        """Sign the cell as it is now (the build that made it, right after its worker put it in place)."""
        folder = self.path(kind, key)
        atomic_write_text(folder / SIGNATURE, sign_listing(secret, cell_listing(folder, kind, key)) + "\n")

    def distrust(self, kind: str, key: str, secret: bytes | None) -> str | None:
        """Why the cell in place may not be used (None: it may): its record names another cell (cells swapped or
        copied under another name), or, with a key, its signature is missing or does not match its files."""
        folder = self.path(kind, key)
        try:
            record = self.record(kind, key)
        except (OSError, ValueError):
            return "has an unreadable record"
        if not isinstance(record, dict) or record.get("kind") != kind or record.get("key") != key:
            return "holds another cell's record"
        if secret is None:
            return None
        try:
            stored = (folder / SIGNATURE).read_text(encoding="utf-8").strip()
        except OSError:
            return "failed its signature (none)"
        try:
            expected = sign_listing(secret, cell_listing(folder, kind, key))
        except (OSError, ValueError):
            return "failed its signature"
        return None if hmac.compare_digest(stored, expected) else "failed its signature"

    def build(self, kind: str, key: str, make: Callable[[Path], dict[str, Any]], force: bool = False) -> bool:
        """Make the cell unless it is there (or ``force``): ``make(folder)`` fills an empty folder and returns the
        cell's record. Returns True when this call built it."""
        final = self.path(kind, key)
        if self.has(kind, key) and not force:
            return False
        try:
            self.cells.mkdir(parents=True, exist_ok=True)
            with atomic_output_dir(final, force=True) as tmp:
                record = make(tmp)
                (tmp / CELL_RECORD).write_text(json.dumps({"kind": kind, "key": key, **record}, indent=1,
                                                          sort_keys=True, default=str), encoding="utf-8")
        except OSError as exc:
            if self.has(kind, key):  # another build put the same cell in place first
                return False
            raise EdgeloraError(f"cache {self.root}: cannot write cell {final.name} ({exc.strerror or exc}); "
                                "check the cache folder is writable") from None
        return True

    def cleanup(self) -> None:
        """What killed builds left: unlocked temporary cell folders and half-written data files."""
        from ..fsutil import remove_stale

        if self.cells.is_dir():
            remove_stale(self.cells)
        for tmp in (self.root / "data").glob(".*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) if self.root.exists() else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
