"""Atomic output folders: the debris of a killed command is removed by the next one, a running command's
folder is left alone, and --force replaces an output in one step, leaving nothing beside it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelora.errors import EdgeloraError
from edgelora.fsutil import TMP_MARK, atomic_output_dir, remove_stale

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def test_unlocked_temp_folders_are_removed_and_locked_ones_kept(tmp_path):
    dead = tmp_path / f".out{TMP_MARK}dead"
    (dead / ".work").mkdir(parents=True)
    (dead / "base.onnx").write_bytes(b"x" * 1000)
    live = tmp_path / f".other{TMP_MARK}live"
    live.mkdir()
    mine = tmp_path / ".not-ours.tmp-1"  # a dotted folder edgelora did not make
    mine.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("new")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name, "out"])
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale(tmp_path) == [live]  # its holder is gone: debris now


def test_force_replaces_in_one_step_and_a_failure_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(EdgeloraError, match="not empty"):
        with atomic_output_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("a failing step")
    assert (out / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    t0 = time.time()
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "v").write_text("2")
        (tmp / ".work").mkdir()  # scratch space is never published
        (tmp / ".work" / "scratch").write_text("x")
    assert time.time() - t0 < 5
    assert (out / "v").read_text() == "2" and sorted(p.name for p in out.iterdir()) == ["v"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_in_a_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EdgeloraError, match="cannot write output") as err:
        with atomic_output_dir(blocker / "out"):
            pass
    assert "\n" not in str(err.value)
    assert Path(blocker).read_text() == "x"
