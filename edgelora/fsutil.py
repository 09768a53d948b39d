"""Atomic output folders: a crash never leaves a folder that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EdgeloraError


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse an output path that exists and is not an empty folder, unless ``force``."""
    if path.exists() and not path.is_dir():
        raise EdgeloraError(f"output {path} exists and is a file; choose a folder path or remove it")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise EdgeloraError(f"output {path} exists and is not empty; choose a new path or pass --force")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary folder is removed and ``path`` is left as it was.
    """
    final = Path(path).absolute()
    check_output_dir(final, force)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result is a normal folder
    except OSError as exc:
        raise EdgeloraError(
            f"cannot write output {final}: {exc.strerror or exc}; choose a writable location"
        ) from None
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
        if final.exists():
            # --force (or an empty folder): move the old one aside first so the swap is two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
            os.rename(final, old / "x")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
