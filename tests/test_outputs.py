"""Outputs that never destroy inputs: every command that writes a folder (train, merge, export, pack, build) refuses
an output that is, contains or lies inside one of its inputs, ``/``, a home folder or the pipeline's own folder;
``--force`` replaces only a folder edgelora made; an output that is a file or cannot be written is one line, before
any work. Each case was a finding: ``output = "."`` in a pipeline deleted the user's files, ``train -o <the data's
folder> --force`` deleted the training data, ``pack DIR -o DIR --force`` replaced the folder with its bundle and
then crashed, and the report writer's OS errors were tracebacks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import assert_one_line_error, make_labelled_adapters, tree

from edgelora.errors import EdgeloraError
from edgelora.fsutil import MARK

UNWRITABLE = Path("/sys/edgelora-out")  # a place even root may not write (sysfs)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tiny_dir, tmp_path_factory) -> Path:
    """A user's project folder: a pipeline file, an adapter, an eval file and a note of their own."""
    root = tmp_path_factory.mktemp("project") / "p"
    make_labelled_adapters(tiny_dir("bert"), root, {"mood": ["negative", "positive"]})
    (root / "mood.tsv").write_text("sentence\tlabel\n" + "".join(
        f"text {i}\t{['negative', 'positive'][i % 2]}\n" for i in range(8)))
    (root / "notes.md").write_text("the user's own file")
    return root


def _pipeline(project: Path, tiny_dir, output: str, cache: str = "cache") -> Path:
    (project / "PIPELINE.toml").write_text(f'''
base = "{tiny_dir("bert")}"
targets = ["cpu-fp32"]
output = "{output}"
cache = "{cache}"

[tasks.mood]
adapter = "mood"
eval = "mood.tsv"
''')
    return project / "PIPELINE.toml"


@pytest.mark.parametrize("output, words", [
    (".", ["contains the pipeline file"]),
    ("..", ["contains the pipeline file"]),
    ("/", ["root folder"]),
    ("mood", ["is the adapter of tasks.mood"]),
    ("mood/out", ["lies inside the adapter of tasks.mood"]),
    ("mood.tsv", ["is the eval file of tasks.mood"]),
    ("notes.md", ["exists and is a file"]),
    ("notes.md/out", ["notes.md is a file"]),
    (str(UNWRITABLE), ["cannot write", "/sys/edgelora-out"]),
    ("cache", ["is or lies inside the cache"]),
])
def test_a_pipeline_output_that_would_destroy_is_refused(output, words, project, tiny_dir, cli):
    if output == str(UNWRITABLE) and not UNWRITABLE.parent.is_dir():
        pytest.skip("no /sys here")
    before = _files(project)
    pipeline = _pipeline(project, tiny_dir, output)
    before["PIPELINE.toml"] = pipeline.read_bytes()
    assert_one_line_error(cli("build", pipeline, "-q"), "PIPELINE.toml: output", *words)
    assert _files(project) == before  # nothing deleted, nothing written: not even the cache


def test_a_pipeline_output_holding_the_users_files_is_refused_and_an_earlier_build_is_not(project, tiny_dir, cli,
                                                                                           tmp_path):
    from edgelora.pipeline import Build

    pipeline = _pipeline(project, tiny_dir, str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("the user's own report")
    assert_one_line_error(cli("build", pipeline, "-q"), "holds files edgelora did not write")
    assert_one_line_error(cli("build", pipeline, "-q", "-o", project), "contains the pipeline file")
    assert (tmp_path / "out" / "report.md").read_text() == "the user's own report"
    # a build's output folder (marked by the build) holding a folder of the user's where a target's folder goes
    (tmp_path / "out" / "report.md").unlink()
    (tmp_path / "out" / MARK).write_text("made by edgelora")
    (tmp_path / "out" / "cpu-fp32").mkdir()
    (tmp_path / "out" / "cpu-fp32" / "keep.txt").write_text("mine")
    assert_one_line_error(cli("build", pipeline, "-q"), "cpu-fp32 was not made by edgelora")
    assert (tmp_path / "out" / "cpu-fp32" / "keep.txt").read_text() == "mine"
    (tmp_path / "out" / "cpu-fp32" / "keep.txt").unlink()
    assert Build(pipeline, quiet=True).p.output == tmp_path / "out"  # empty target folder, marked output: fine


def test_the_report_writers_os_errors_are_one_line(project, tiny_dir, tmp_path):
    from edgelora.pipeline import Build
    from edgelora.pipeline.report import write_report

    pipeline = _pipeline(project, tiny_dir, str(tmp_path / "out"))
    b = Build(pipeline, quiet=True)
    (tmp_path / "out").write_text("made a file after the build started")
    with pytest.raises(EdgeloraError, match=f"cannot write the build report in {tmp_path / 'out'}") as err:
        write_report(b)
    assert "\n" not in str(err.value) and tree(tmp_path) == ["out"]
    if UNWRITABLE.parent.is_dir():
        b.p = replace(b.p, output=UNWRITABLE)
        with pytest.raises(EdgeloraError, match=f"cannot write output {UNWRITABLE}"):
            write_report(b)


def test_train_never_writes_over_its_data(project, tiny_dir, tmp_path, cli):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_bytes((project / "mood.tsv").read_bytes())
    before = _files(tmp_path)
    args = ["train", "--train", data / "train.tsv", "--base", tiny_dir("bert"), "--max-steps", "1", "-q"]
    for out, words in ((data, ["contains the training data", str(data / "train.tsv")]),
                       (data / "train.tsv", ["is the training data"]), (tmp_path, ["contains the training data"]),
                       (data / "train.tsv" / "o", ["lies inside the training data"]),
                       (tiny_dir("bert"), ["is the base"])):
        assert_one_line_error(cli(*args, "-o", out, "--force"), f"output {out}", *words)
    assert_one_line_error(cli(*args, "--eval", project / "mood.tsv", "-o", project, "--force"), "the eval data")
    assert _files(tmp_path) == before


def _file_outputs(tmp_path: Path) -> list[tuple[Path, str]]:
    """An output that is a file, one under a file, one where nobody may write: each a one-line error."""
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path / "afile", "exists and is a file"), (tmp_path / "afile" / "o", "afile is a file")]
    if UNWRITABLE.parent.is_dir():
        cases.append((UNWRITABLE, "cannot write output"))
    return cases


def test_an_output_that_is_a_file_or_unwritable_is_one_line_before_any_work(project, tiny_dir, tmp_path, cli):
    base, adapter = tiny_dir("bert"), project / "mood"
    for out, words in _file_outputs(tmp_path):
        for args in (["train", "--train", project / "mood.tsv", "--base", base, "--max-steps", "1"],
                     ["merge", "--adapter", adapter, "--base", base],
                     ["export", "--adapter", f"mood={adapter}", "--base", base]):
            assert_one_line_error(cli(*args, "-o", out, "-q"), words)
    assert (tmp_path / "afile").read_text() == "x" and tree(tmp_path) == ["afile"]


@pytest.fixture(scope="module")
def deployment(project, tiny_dir, tmp_path_factory) -> Path:
    from conftest import export_folder

    out = tmp_path_factory.mktemp("dep") / "dep"
    return export_folder(tiny_dir("bert"), {"mood": project / "mood"}, out, "--threads", "1")


def test_pack_never_replaces_the_folder_it_packs(deployment, tmp_path, cli):
    before = _files(deployment)
    for out, words in ((deployment, "is the deployment folder"), (deployment / "bundle", "lies inside the deployment"),
                       (deployment.parent, "contains the deployment folder")):
        assert_one_line_error(cli("pack", deployment, "-o", out, "--force"), f"output {out}", words)
    for out, words in _file_outputs(tmp_path):
        assert_one_line_error(cli("pack", deployment, "-o", out), words)
    assert _files(deployment) == before and cli("verify", deployment).code == 0
    assert cli("pack", deployment, "-o", tmp_path / "b").code == 0
    assert cli("pack", deployment, "-o", tmp_path / "b", "--force").code == 0  # its own bundle: replaced
    assert not (tmp_path / "b" / MARK).exists()  # the bundle holds only what the runtime reads (its manifest marks it)


def test_export_and_merge_never_write_over_an_input(project, deployment, tiny_dir, tmp_path, cli):
    base, adapter = tiny_dir("bert"), project / "mood"
    before = _files(project)
    export = ["export", "--base", base, "--adapter", f"mood={adapter}", "-q", "--force"]
    assert_one_line_error(cli(*export, "-o", adapter), "is the adapter mood")
    assert_one_line_error(cli(*export, "--eval", f"mood={project / 'mood.tsv'}", "-o", project),
                          "contains the adapter mood")
    assert_one_line_error(cli(*export, "-o", base / "engines"), "lies inside the base")
    assert_one_line_error(cli("merge", "--base", base, "--adapter", adapter, "-o", adapter, "--force"),
                          "is the adapter")
    assert_one_line_error(cli("merge", "--base", base, "--adapter", adapter, "-o", project, "--force"),
                          "contains the adapter")
    assert _files(project) == before
    # --force on a folder edgelora made (an export over an export) still replaces it
    assert cli(*export, "--threads", "1", "-o", deployment).code == 0 and cli("verify", deployment).code == 0
