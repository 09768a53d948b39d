"""``edgelora build`` on a cache it cannot trust: each tampering of the issue (a delta's classifier negated with its
stored reference, the base engine's weights scaled, two task cells swapped, a cell's recorded accuracy edited) is
found, the cell rebuilt and reported, and the folder published is the one a clean build publishes; with a key set,
cells are signed and an edited or unsigned cell fails its signature. A tiny BERT, two PEFT adapters, cpu-fp32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_labelled_adapters
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from edgelora.pipeline import Build
from edgelora.pipeline.cache import KEY_ENV, SIGNATURE, Cache, cell_listing, sign_listing

REPO = Path(__file__).resolve().parents[1]
LABELS = {"mood": ["negative", "positive"], "topic": ["world", "sports", "business", "science"]}
LABEL = "cpu-fp32"


def _pipeline(folder: Path, base: Path, adapters: dict[str, Path]) -> Path:
    folder.mkdir(parents=True)
    rows = (REPO / "examples" / "data" / "sst2-dev-500.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [r.split("\t")[0] for r in rows[:40]]
    for task, labels in LABELS.items():
        shutil.copytree(adapters[task], folder / task)
        (folder / f"{task}.tsv").write_text("sentence\tlabel\n" + "".join(
            f"{t}\t{labels[i % len(labels)]}\n" for i, t in enumerate(texts)), encoding="utf-8")
    tasks = "".join(f'[tasks.{t}]\nadapter = "{t}"\neval = "{t}.tsv"\n' for t in LABELS)
    (folder / "PIPELINE.toml").write_text(f'base = "{base}"\ntargets = ["{LABEL}"]\noutput = "out"\ncache = "cache"\n'
                                          f'latency_runs = 3\n[gates]\nmax_accuracy_drop = 5.0\n{tasks}',
                                          encoding="utf-8")
    return folder / "PIPELINE.toml"


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    """Each test starts without a cache key, whatever the environment running the suite holds."""
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def clean(tiny_dir, tmp_path_factory):
    """One clean build without a key: the pipeline, its cache as built, and the published folder's manifest."""
    base = tiny_dir("bert")
    adapters = make_labelled_adapters(base, tmp_path_factory.mktemp("trust_adapters"), LABELS)
    pipeline = _pipeline(tmp_path_factory.mktemp("trust") / "p", base, adapters)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(KEY_ENV, raising=False)
        result = Build(pipeline, quiet=True).run()
    assert result.failures == [] and result.report["cache"] == [], result.failures
    assert all(r["numbers"] == "re-derived" for r in result.report["cells"])
    return pipeline, _manifest(pipeline.parent / "out" / LABEL), result.report


def _manifest(folder: Path) -> dict:
    """The folder's manifest (every file's size and sha256), where the adapters were read from set aside."""
    m = json.loads((folder / "manifest.json").read_text())
    for t in m["tasks"].values():
        t["adapter_path"] = None
    return m


def _cell(cache: Path, kind: str, task: str | None = None) -> Path:
    """The cache's cell of ``kind`` (a task cell: the one for ``task``)."""
    for cell in sorted((cache / "cells").glob(f"{kind}-*")):
        if task is None or json.loads((cell / "task-stage.json").read_text())["name"] == task:
            return cell
    raise AssertionError(f"no {kind} cell for {task}")


def _copy(clean, tmp_path: Path) -> tuple[Path, Path]:
    """The clean build's cache copied beside a new output folder: the next build assembles from the copy."""
    pipeline, _, _ = clean
    cache, out = tmp_path / "cache", tmp_path / "out"
    shutil.copytree(pipeline.parent / "cache", cache)
    return cache, out


def _rebuild(clean, cache: Path, out: Path, *notes: str):
    """Build from the tampered cache; every note is reported, and what is published is the clean build's."""
    pipeline, manifest, report = clean
    result = Build(pipeline, quiet=True, cache=cache, output=out).run()
    assert result.failures == [], result.failures
    for note in notes:
        assert any(n.startswith(f"cache: cell {note}") and n.endswith(": rebuilt") for n in result.report["cache"]), \
            (note, result.report["cache"])
    assert _manifest(out / LABEL) == manifest
    clean_rows = {(r["task"], r["target"]): r["accuracy"] for r in report["cells"]}
    assert {(r["task"], r["target"]): r["accuracy"] for r in result.report["cells"]} == clean_rows
    return result


def test_a_negated_classifier_and_its_reference_are_rebuilt(clean, tmp_path):
    """The mood delta's classifier negated together with the reference logits stored beside it (so the export's
    own runtime check would still agree): the delta computed again from the adapter differs, the cell is rebuilt."""
    cache, out = _copy(clean, tmp_path)
    cell = _cell(cache, "task", "mood")
    delta = cell / "tasks" / "mood" / "delta.safetensors"
    tensors = load_file(str(delta))
    with safe_open(str(delta), "np") as f:
        meta = f.metadata()
    save_file({k: -v if k.startswith("head.classifier") else v for k, v in tensors.items()}, str(delta), meta)
    ref = cell / "task-stage-reference.safetensors"
    save_file({"logits": -load_file(str(ref))["logits"]}, str(ref), {"format": "1"})
    result = _rebuild(clean, cache, out, "task/mood/cpu-fp32 holds a delta that differs from a fresh computation")
    assert result.report["built"]["task"] == 1


def test_scaled_base_weights_are_rebuilt(clean, tmp_path):
    """Every weight in the base engine's data file scaled by 1.5: the fresh PyTorch checks miss, the base cell
    (and the task engines that read its weights file) are rebuilt."""
    cache, out = _copy(clean, tmp_path)
    data = _cell(cache, "base") / "base" / "model.onnx.data"
    (np.fromfile(data, np.float32) * np.float32(1.5)).tofile(data)
    result = _rebuild(clean, cache, out, "base/cpu-fp32")
    assert result.report["built"]["base"] == 1


def test_swapped_task_cells_are_rebuilt(clean, tmp_path):
    """The mood and topic cells' folders swapped: each holds the other's record, both are rebuilt."""
    cache, out = _copy(clean, tmp_path)
    mood, topic = _cell(cache, "task", "mood"), _cell(cache, "task", "topic")
    mood.rename(cache / "x")
    topic.rename(mood)
    (cache / "x").rename(topic)
    _rebuild(clean, cache, out, "task/mood/cpu-fp32 holds another cell's record",
             "task/topic/cpu-fp32 holds another cell's record")


def test_a_cell_that_cannot_be_assembled_is_rebuilt(clean, tmp_path):
    """The topic cell's stage state cut short (as a stage of another format would fail to read): the cell is
    rebuilt instead of failing the build."""
    cache, out = _copy(clean, tmp_path)
    state = _cell(cache, "task", "topic") / "task-stage.json"
    state.write_text(state.read_text()[:100])
    _rebuild(clean, cache, out, "task/topic/cpu-fp32 cannot be assembled (task-stage.json: unreadable stage state")


def test_an_edited_accuracy_is_not_a_gate_number(clean, tmp_path):
    """The topic cell records 100% accuracy: the gates read the accuracy measured on the assembled folder, and the
    cell, which is not what it claims, is rebuilt; then, with the folder published and unchanged, the same edit
    is found against the numbers its publishing build re-derived."""
    cache, out = _copy(clean, tmp_path)
    for _ in range(2):
        state = _cell(cache, "task", "topic") / "task-stage.json"
        record = json.loads(state.read_text())
        record["report"]["accuracy"] = 1.0
        state.write_text(json.dumps(record))
        result = _rebuild(clean, cache, out, "task/topic/cpu-fp32 records accuracy 1")
        assert result.report["built"]["task"] == 1
    assert result.report["built"]["folder"] == 0  # the second time: the published folder was kept


def test_with_a_key_cells_are_signed_and_an_edited_cell_fails_its_signature(clean, tmp_path, monkeypatch, cli):
    """EDGELORA_CACHE_KEY set: the clean cache's unsigned cells fail their signature and are rebuilt (and signed);
    a cell whose record changes after (its latency, a number no other check re-derives) fails its signature and
    is rebuilt, and the CLI prints the line; a signature made with another key does not hold."""
    pipeline, _, _ = clean
    cache, out = _copy(clean, tmp_path)
    monkeypatch.setenv(KEY_ENV, "test-secret")
    first = _rebuild(clean, cache, out, "base/cpu-fp32 failed its signature (none)",
                     "task/mood/cpu-fp32 failed its signature (none)")
    assert first.report["cache_signed"] and first.report["built"] == {"train": 0, "base": 1, "task": 2, "folder": 1}
    cell = _cell(cache, "task", "mood")
    assert (cell / SIGNATURE).read_text().strip() == sign_listing(b"test-secret", cell_listing(cell, "task", json.loads(
        (cell / "cell.json").read_text())["key"]))
    state = cell / "task-stage.json"
    state.write_text(state.read_text().replace('"latency_ms":', '"latency_ms": 0.001, "was":', 1))
    res = cli("build", str(pipeline), "-q", "--cache", str(cache), "-o", str(out))
    assert res.code == 0, res.err
    assert "cache: cell task/mood/cpu-fp32 failed its signature: rebuilt" in res.err.splitlines()
    c = Cache(cache)  # the rebuilt cell holds under this key, under no other
    key = json.loads((cell / "cell.json").read_text())["key"]
    assert c.distrust("task", key, b"test-secret") is None
    assert c.distrust("task", key, b"another-secret") == "failed its signature"


def test_the_workflow_passes_the_cache_key_to_every_job_that_builds():
    text = (REPO / ".github" / "workflows" / "engines.yml").read_text()
    assert text.count(f"{KEY_ENV}: ${{{{ secrets.{KEY_ENV} }}}}") == 3  # prepare, cell, assemble


def test_a_tampered_data_selection_is_made_again(clean, tmp_path):
    """A selection file the cache holds (a slice of a data file) edited: it is made again from its source."""
    pipeline, _, _ = clean
    text = pipeline.read_text().replace('eval = "mood.tsv"', 'eval = { file = "mood.tsv", rows = 30 }')
    p2 = pipeline.with_name("SLICE.toml")
    p2.write_text(text)
    cache, out = _copy(clean, tmp_path)
    Build(p2, quiet=True, cache=cache, output=out).run()
    selection = next((cache / "data").glob("*.jsonl"))
    good = selection.read_text()
    selection.write_text(good.replace('"negative"', '"positive"'))
    result = Build(p2, quiet=True, cache=cache, output=out).run()
    p2.unlink()
    assert any(n.startswith(f"cache: data {selection.name}") for n in result.report["cache"]), result.report["cache"]
    assert selection.read_text() == good


def test_the_build_command_prints_nothing_about_a_clean_cache(clean, tmp_path):
    pipeline, _, _ = clean
    proc = subprocess.run([sys.executable, "-m", "edgelora.cli", "build", str(pipeline), "-q"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", KEY_ENV: ""})
    assert proc.returncode == 0 and "cache:" not in proc.stderr, proc.stderr
