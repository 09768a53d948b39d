"""Atomic output folders: the debris of a killed command is removed by the next one, a running command's
folder is left alone, and --force replaces an output in one step, leaving nothing beside it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgelora.errors import EdgeloraError
from edgelora.fsutil import MARK, TMP_MARK, atomic_output_dir, check_output, made_by_edgelora, remove_stale

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
    assert (out / "v").read_text() == "2" and sorted(p.name for p in out.iterdir()) == [MARK, "v"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_in_a_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EdgeloraError, match="cannot write output") as err:
        with atomic_output_dir(blocker / "out"):
            pass
    assert "\n" not in str(err.value)
    assert Path(blocker).read_text() == "x"


# ---------------------------------------------------------------------------------------------- never destroy inputs
def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


def test_an_output_may_not_be_contain_or_lie_inside_an_input(tmp_path):
    data = _user_folder(tmp_path / "data") / "notes.txt"
    adapter = _user_folder(tmp_path / "adapters" / "sst2")
    inputs = [("training data", data), ("adapter", adapter), ("eval data", None)]
    for out, relation in ((data, "is"), (tmp_path / "data", "contains"), (tmp_path / "adapters", "contains"),
                          (adapter, "is"), (adapter / "out", "lies inside"), (data / "out", "lies inside")):
        with pytest.raises(EdgeloraError, match=f"output {out} {relation} the ") as err:
            check_output(out, force=True, inputs=inputs)
        assert "\n" not in str(err.value)
    link = tmp_path / "link"
    link.symlink_to(adapter)  # the same folder by another name
    with pytest.raises(EdgeloraError, match="is the adapter"):
        check_output(link / ".", force=True, inputs=inputs)
    assert check_output(tmp_path / "new", inputs=inputs) == (tmp_path / "new").resolve()
    assert (data.read_text(), sorted(p.name for p in adapter.iterdir())) == ("mine", ["notes.txt"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "data", "link"]  # the probe left nothing


def test_root_homes_and_the_current_folder_are_refused(tmp_path, monkeypatch):
    for out, words in (("/", "root folder"), (Path.home(), "a home folder"), ("~", "a home folder"),
                       ("/home", "holds the home folder")):
        if out == "/home" and not any(Path("/home").glob("*/")):
            continue
        with pytest.raises(EdgeloraError, match=words):
            check_output(out, force=True)
    here = tmp_path / "work"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", here, tmp_path):
        with pytest.raises(EdgeloraError, match="current folder"):
            check_output(out, force=True)
    check_output(".", replace=False)  # written into, not replaced (a pipeline's output): empty, so allowed
    with pytest.raises(EdgeloraError, match="holds files edgelora did not write"):
        check_output(tmp_path, replace=False)


def test_force_replaces_only_a_folder_edgelora_made(tmp_path):
    mine = _user_folder(tmp_path / "mine")
    with pytest.raises(EdgeloraError, match="not empty; choose a new path or pass --force"):
        check_output(mine)
    with pytest.raises(EdgeloraError, match=f"output {mine} was not made by edgelora; refusing to replace it with "
                                            "--force; choose a new path"):
        check_output(mine, force=True)
    with pytest.raises(EdgeloraError, match="was not made by edgelora"):
        with atomic_output_dir(mine, force=True) as tmp:
            (tmp / "x").write_text("new")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # a folder it made: marked when it holds no record of its own; replaced with --force
    made = tmp_path / "made"
    with atomic_output_dir(made) as tmp:
        (tmp / "x").write_text("1")
    assert made_by_edgelora(made) and (made / MARK).is_file()
    with atomic_output_dir(made, force=True) as tmp:
        (tmp / "x").write_text("2")
    assert (made / "x").read_text() == "2"
    # records only edgelora writes mark a folder by themselves (and folders made before the mark existed)
    for name, text in (("manifest.json", '{"format": 3, "edgelora_version": "0.1"}'),
                       ("edgelora.json", '{"base_fingerprint": "ab"}'),
                       ("config.json", '{"edgelora_merged_adapter": {}}'), ("cell.json", '{"key": "k"}')):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text(text)
        assert made_by_edgelora(folder), name
        with atomic_output_dir(folder, force=True) as tmp:
            (tmp / name).write_text(text)
        assert sorted(p.name for p in folder.iterdir()) == [name], name  # no mark beside a record
    for name, text in (("manifest.json", '{"name": "my web app"}'), ("config.json", '{"model_type": "bert"}'),
                       ("manifest.json", "not json")):
        folder = tmp_path / f"other-{name}"
        folder.mkdir(exist_ok=True)
        (folder / name).write_text(text)
        assert not made_by_edgelora(folder), text


def test_a_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(EdgeloraError, match="exists and is a file"):
        check_output(blocker)
    with pytest.raises(EdgeloraError, match=f"{blocker} is a file"):
        check_output(blocker / "a" / "out")
    with pytest.raises(EdgeloraError, match="is a symbolic link"):
        (tmp_path / "ln").symlink_to(tmp_path / "elsewhere")
        check_output(tmp_path / "ln")
    if Path("/sys").is_dir():  # a place even root may not write
        with pytest.raises(EdgeloraError, match="cannot write output /sys/edgelora-out"):
            check_output("/sys/edgelora-out")
    assert blocker.read_text() == "x"


def test_a_killed_commands_debris_and_edgelora_folders_do_not_make_a_folder_foreign(tmp_path):
    """A build killed before its record was written leaves its output folder holding a published deployment
    folder and debris only: the rerun writes into it. One file of the user's beside them, and it is refused."""
    out = tmp_path / "out"
    with atomic_output_dir(out / "cpu-fp32") as tmp:
        (tmp / "manifest.json").write_text('{"format": 3, "edgelora_version": "0.1"}')
    (out / f".cpu-int8{TMP_MARK}abc").mkdir()
    (out / ".report.json.123.tmp").write_text("{")
    assert not made_by_edgelora(out)
    check_output(out, replace=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EdgeloraError, match="holds files edgelora did not write"):
        check_output(out, replace=False)
