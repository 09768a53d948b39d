"""Atomic output folders: a crash never leaves a folder that looks complete, nor debris that stays.

A command writes into ``.NAME.edgelora-tmp-XXXX`` beside the output (its scratch files too, under
``.work`` inside it: one place holds everything in flight), holding an exclusive ``flock`` on that folder
while it works. The lock dies with the process, even on ``kill -9``, so the next command writing into the
same parent knows an unlocked ``.*.edgelora-tmp-*`` folder for the debris of a dead one and removes it.

The finished folder takes the output's place in one step: a ``rename`` when the output is new; with
``--force``, an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) of the two folders, after which the
old contents sit under the temporary name (unlocked, so removed now or by the next command if a kill
comes first). No kill point leaves an output that is half old, half new, or a ``.old`` folder behind.
A full disk or a folder without write permission is a one-line error naming the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import EdgeloraError

TMP_MARK = ".edgelora-tmp-"
WORK_DIR = ".work"
_RENAME_EXCHANGE = 2  # linux/fs.h


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse an output path that exists and is not an empty folder, unless ``force``."""
    if path.exists() and not path.is_dir():
        raise EdgeloraError(f"output {path} exists and is a file; choose a folder path or remove it")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise EdgeloraError(f"output {path} exists and is not empty; choose a new path or pass --force")


def remove_stale(parent: Path) -> list[Path]:
    """Remove the temporary folders in ``parent`` that no living edgelora process holds (debris of a killed
    command); returns what was removed. A folder still locked belongs to a running command and is left."""
    removed = []
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(".") and TMP_MARK in p.name]
    except OSError:
        return removed
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a command is writing it now
            os.close(fd)
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def disk_error(exc: BaseException, output: Path, inside: Path) -> EdgeloraError | None:
    """A one-line error for an error the disk caused while writing under ``inside`` (an OSError, or a library's
    error wrapping one or quoting the system's message), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        no = getattr(seen, "errno", None)
        text = str(seen)
        if no in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left on device" in text:
            return EdgeloraError(f"no space left on the device while writing {output}; free some space (a W1 "
                                 "export needs about 1 GB while it works) or choose another --output")
        filename = getattr(seen, "filename", None)
        if no in (errno.EACCES, errno.EPERM, errno.EROFS) and filename and Path(filename).is_relative_to(inside):
            return EdgeloraError(f"cannot write output {output} ({os.strerror(no)}); choose a writable location")
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes ``path``'s place in one step.

    On any error (or a kill) the temporary folder is removed (or left unlocked for the next command to
    remove) and ``path`` is left as it was. Scratch files go in :func:`scratch_dir` of the yielded folder.
    """
    final = Path(path).absolute()
    check_output_dir(final, force)
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=parent))
        lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(lock, fcntl.LOCK_EX)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result is a normal folder
    except OSError as exc:
        raise disk_error(exc, final, parent) or EdgeloraError(
            f"cannot write output {final}: {exc.strerror or exc}; choose a writable location") from None
    try:
        yield tmp
        shutil.rmtree(tmp / WORK_DIR, ignore_errors=True)
        for f in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            if f.is_file() and not f.is_symlink():
                f.chmod(0o666 & ~umask)
        if not final.exists():
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # the old output, now under the unlocked temporary name
        else:  # no atomic exchange on this file system: move the old one aside under a name the cleanup knows
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}old-", dir=parent))
            os.rename(final, old / "x")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, EdgeloraError):
            err = disk_error(exc, final, tmp)
            if err is not None:
                raise err from None
        raise
    finally:
        os.close(lock)


@contextlib.contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """Scratch space inside an :func:`atomic_output_dir` folder (removed before the folder is published);
    while it is open, Python's ``tempfile`` (and the libraries that use it, such as ONNX Runtime's
    quantizer) write there too, so a kill leaves nothing in the system's temporary folder."""
    work = out / WORK_DIR
    work.mkdir(exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(work)
    try:
        yield work
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(work, ignore_errors=True)
