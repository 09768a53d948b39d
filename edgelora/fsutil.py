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

Outputs never destroy inputs (:func:`check_output`, which every command that writes a folder calls before any
work): an output may not be, contain or lie inside one of the command's inputs, nor be ``/``, a home folder or
the folder the user stands in; and ``--force`` replaces only a folder edgelora made (:func:`made_by_edgelora`:
the files it always writes there, or a ``.edgelora-output`` mark where it writes none of them).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import EdgeloraError

TMP_MARK = ".edgelora-tmp-"
WORK_DIR = ".work"
_RENAME_EXCHANGE = 2  # linux/fs.h
MARK = ".edgelora-output"  # in an output folder that holds none of the records below: edgelora made it
_MARK_TEXT = "made by edgelora: `--force` may replace this folder\n"
# Records only edgelora writes, each recognised by a field no other tool's file of that name has: a folder that
# holds one was made by edgelora (also those made before the mark existed), and carries no mark beside it (a
# device bundle holds only what the runtime reads).
_RECORDS = (
    ("manifest.json", "edgelora_version"),  # deployment folder, device bundle
    ("edgelora.json", "base_fingerprint"),  # adapter trained by edgelora
    ("config.json", "edgelora_merged_adapter"),  # merged model (base.MERGED_MARKER)
    ("cell.json", "key"),  # build cache cell
    (".edgelora-build.json", None),  # a pipeline's output folder (pipeline/build.py STAMP)
)
InputPaths = Iterable[tuple[str, "str | os.PathLike[str] | None"]]


def made_by_edgelora(folder: Path) -> bool:
    """Whether ``folder`` is one edgelora wrote: it holds the mark, or one of the records only edgelora writes."""
    if (folder / MARK).is_file() and not (folder / MARK).is_symlink():
        return True
    for name, field in _RECORDS:
        record = folder / name
        try:
            if not record.is_file() or record.is_symlink() or record.stat().st_size > 64 << 20:
                continue
            if field is None:
                return True
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and field in data:
            return True
    return False


def mark_output(folder: Path) -> None:
    """Mark ``folder`` as edgelora's unless a record already says so (a folder a command writes into beside what
    is there: a pipeline's output)."""
    if not made_by_edgelora(folder):
        (folder / MARK).write_text(_MARK_TEXT, encoding="utf-8")


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _homes() -> set[Path]:
    """The user's home, root's, and every folder at the top of /home."""
    homes = {Path("/root")}
    with contextlib.suppress(OSError, RuntimeError, KeyError):  # no HOME and no passwd entry: no home to protect
        homes.add(Path.home())
    with contextlib.suppress(OSError):
        homes |= {p for p in Path("/home").iterdir() if p.is_dir()}
    return {_real(h) for h in homes}


def check_output(path: str | os.PathLike[str], *, force: bool = False, inputs: InputPaths = (),
                 replace: bool = True, name: str = "output") -> Path:
    """Refuse an output that would destroy something; returns its real path. Every command that writes a folder
    calls it before any work (and :func:`atomic_output_dir` again, without the inputs, as it starts).

    ``inputs``: (what, path) of everything the command reads (adapter folders, the base, data files, the folder
    being packed, the pipeline file); the output may not be one, contain one or lie inside one: replacing it would
    delete that input, or writing into it would change it. Never ``/``, a home folder or one that holds one, nor
    (``replace``: a folder the command swaps whole) the current folder or one that holds it: the user's shell would
    be left in a deleted folder. An existing output must be a folder; a non-empty one needs ``force`` and must be
    one edgelora made (:func:`made_by_edgelora`), so ``--force`` on the wrong path deletes nothing of the user's.
    ``replace=False``: a folder the command writes into beside what is there (a pipeline's output), which must
    then be empty or edgelora's. A path that cannot be written (under a file, a read-only place) is refused too,
    before the work and not after it.
    """
    given = Path(path)
    real = _real(given)
    _refuse_places(given, real, replace, name)
    _refuse_inputs(given, real, inputs, name)
    if given.is_symlink():
        raise EdgeloraError(f"{name} {given} is a symbolic link; give the folder it points to "
                            f"({os.path.realpath(given)}) or a new path")
    if given.exists() and not given.is_dir():
        raise EdgeloraError(f"{name} {given} exists and is a file; choose a folder path or remove it")
    try:
        full = given.is_dir() and any(given.iterdir())
    except OSError as exc:
        raise EdgeloraError(f"cannot read {name} {given} ({exc.strerror or exc}); choose a folder you own") from None
    if full and not made_by_edgelora(given) and not _only_edgelora_entries(given):
        if not replace:
            raise EdgeloraError(f"{name} {given} holds files edgelora did not write; choose a new or empty folder")
        if force:
            raise EdgeloraError(f"{name} {given} was not made by edgelora; refusing to replace it with --force; "
                                "choose a new path")
    if full and replace and not force:
        raise EdgeloraError(f"{name} {given} exists and is not empty; choose a new path or pass --force")
    _probe(given, name)
    return real


def _only_edgelora_entries(folder: Path) -> bool:
    """Every entry is edgelora's: a folder it made, or the debris a killed command left (an unlocked temporary
    folder, a half-written ``.NAME.PID.tmp`` file), which the next command removes. A killed build leaves its
    output folder so, before the build's own record is in it."""
    for entry in folder.iterdir():
        if TMP_MARK in entry.name or re.fullmatch(r"\..+\.\d+\.tmp", entry.name):
            continue
        if not (entry.is_dir() and not entry.is_symlink() and made_by_edgelora(entry)):
            return False
    return True


def _refuse_places(given: Path, real: Path, replace: bool, name: str) -> None:
    """``/``, a home folder (or one that holds one), and for a folder replaced whole, the current folder (or one
    that holds it)."""
    if real == Path(real.anchor):
        raise EdgeloraError(f"{name} {given} is the root folder /; choose a folder of its own, e.g. ./out")
    home = next((h for h in sorted(_homes()) if h.is_relative_to(real)), None)
    if home is not None:
        which = "a home folder" if home == real else f"a folder that holds the home folder {home}"
        raise EdgeloraError(f"{name} {given} is {which}; choose a new folder inside it, e.g. {home / 'out'}")
    try:
        cwd = _real(os.getcwd())
    except OSError:  # the current folder was deleted: nothing to protect
        return
    if replace and cwd.is_relative_to(real):
        which = "is the current folder" if cwd == real else f"holds the current folder {cwd}"
        raise EdgeloraError(f"{name} {given} {which}; replacing it would leave you in a deleted folder; choose a "
                            "new folder below it, e.g. ./out")


def _refuse_inputs(given: Path, real: Path, inputs: InputPaths, name: str) -> None:
    for what, inp in inputs:
        if inp is None:
            continue
        source = _real(inp)
        if real == source:
            relation = "is"
        elif source.is_relative_to(real):
            relation = "contains"
        elif real.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise EdgeloraError(f"{name} {given} {relation} the {what} {inp}; writing there would destroy or change "
                            "an input; choose a path outside every input")


def _probe(path: Path, name: str) -> None:
    """Make and remove a folder where the output will go (its nearest existing folder): an output under a file
    or in a place no one may write fails here, before minutes of work, not after them."""
    here = path.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise EdgeloraError(f"cannot write {name} {path}: {here} is a file; choose a folder path")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}probe-", dir=here)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT) and disk_error(exc, path, here)
        raise full or EdgeloraError(
            f"cannot write {name} {path} ({exc.strerror or exc}); choose a writable location") from None
    with contextlib.suppress(FileNotFoundError):  # another command's cleanup may have taken it (it was unlocked)
        os.rmdir(probe)


def check_output_dir(path: Path, force: bool) -> None:
    """:func:`check_output` without inputs (the rules every output folder is held to)."""
    check_output(path, force=force)


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
    check_output(final, force=force)
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
        mark_output(tmp)  # published with the folder: --force may replace it later
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
