"""Trust: the runtime and the exporter used the way the world uses them — many threads switching tasks,
folders they did not write (or that were changed, truncated, or lie), inputs from anywhere, kills and full
disks, adapters as PEFT saves them by default. Each test names the finding it covers; each failed on the
main branch before the fix (see the closing note of the issue for old and new behaviour)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, load_task_model, make_labelled_adapters, tree

from edgelora.errors import EdgeloraError
from edgelora.format.delta import read_delta, write_delta
from edgelora.runtime import DeltaError, Runtime

LABELS = {"mood": ["sad", "glad"], "topic": ["world", "sports", "business", "science"]}
TEXTS = ["a gorgeous, witty film", "stocks fell as oil rose", "the match went to penalties", "dull",
         "new chip doubles battery life", "I laughed and cried", "rates stay on hold", "z" * 40]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def labelled(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """Two tiny BERT classification adapters with label names (2 and 4 classes), exported to cpu-fp32."""
    root = tmp_path_factory.mktemp("labelled")
    adapters = make_labelled_adapters(tiny_dir("bert"), root, LABELS)
    dep = root / "dep"
    _export(tiny_dir("bert"), adapters, dep)
    return {"dep": dep, **adapters}


def _export(base: Path, adapters: dict[str, Path], out: Path, *extra: str) -> None:
    from edgelora.cli import main

    args = ["export", "--base", str(base), "--target", "cpu-fp32", "-o", str(out), "-q", *extra]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), "export failed"


@pytest.fixture
def dep(labelled, tmp_path) -> Path:
    """A writable copy of the labelled deployment for one test to break."""
    return Path(shutil.copytree(labelled["dep"], tmp_path / "dep"))


def _relist(dep: Path, rel: str) -> None:
    """Make the manifest's files table agree with ``rel`` as it is now: a folder that lies consistently,
    so that the checks behind the hash are the ones tested."""
    manifest = json.loads((dep / "manifest.json").read_text())
    data = (dep / rel).read_bytes()
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (dep / "manifest.json").write_text(json.dumps(manifest))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


def _cli_fails_in_one_line(cli, *args, needle: str = "") -> str:
    res = cli(*args)
    assert res.code == 2, (res.code, res.err[-500:])
    assert res.err.startswith("error: ") and res.err.count("\n") == 1 and "Traceback" not in res.err, res.err
    assert needle in res.err, res.err
    return res.err


# ---------------------------------------------------------------------------------------------- wrong answers
@pytest.mark.parametrize("unmerged", [False, True], ids=["swap", "unmerged"])
def test_classify_under_task_switching_never_mixes_tasks(labelled, unmerged):
    """Finding: classify() read the active task after its run returned, so a switch in between labelled one
    task's probabilities with the other's names (or raised IndexError). 4 threads classify — two naming their
    task, two using the active one — while a fifth switches every ~2 ms: every result must be exactly one
    task's answer for that text (label, from that task's names, and probability), ≥ 5,000 calls, 0 errors."""
    rt = Runtime.open(labelled["dep"], threads=1, unmerged=unmerged)
    assert rt.mode == ("unmerged" if unmerged else "swap")
    ref = {task: rt.classify(TEXTS, task=task) for task in LABELS}  # single-threaded reference
    rt.activate("mood")
    owner = {label: task for task, labels in LABELS.items() for label in labels}
    stop = threading.Event()
    bad: list[str] = []
    calls = [0] * 4

    def reader(k: int) -> None:
        rng = np.random.default_rng(k)
        while not stop.is_set() and not bad:
            i = int(rng.integers(len(TEXTS)))
            task = list(LABELS)[int(rng.integers(2))] if k % 2 else None
            try:
                [(label, prob)] = rt.classify([TEXTS[i]], task=task)
            except Exception as exc:  # noqa: BLE001 - any exception is a finding
                bad.append(f"{type(exc).__name__}: {exc}")
                return
            who = owner.get(label)
            if who is None or (task is not None and who != task) or ref[who][i][0] != label \
                    or abs(ref[who][i][1] - prob) > 1e-5:
                bad.append(f"thread {k} task={task}: {TEXTS[i]!r} -> {label} {prob:.6f}; reference {ref}")
            calls[k] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    switches = 0
    deadline = time.monotonic() + 120
    while sum(calls) < 5000 and not bad and time.monotonic() < deadline:
        rt.activate(list(LABELS)[switches % 2])
        switches += 1
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
    assert not bad, bad[:3]
    assert sum(calls) >= 5000 and switches > 100 and min(calls) > 0, (calls, switches)


def test_a_named_task_runs_without_changing_the_active_one(labelled):
    rt = Runtime.open(labelled["dep"], threads=1)
    rt.activate("mood")
    before = rt.classify(TEXTS)
    topic = rt.classify(TEXTS, task="topic")
    assert rt.active == "mood" and rt.classify(TEXTS) == before
    assert {label for label, _ in topic} <= set(LABELS["topic"])
    rt.activate("topic")
    assert rt.classify(TEXTS) == topic  # the same weights, whether named or active
    pred = rt.predict(text=TEXTS[:2], task="mood")
    assert pred.task == "mood" and pred.labels == tuple(LABELS["mood"]) and pred.probabilities.shape == (2, 2)


def test_load_replacing_a_task_brings_its_head_and_labels_or_is_refused(labelled, tmp_path):
    """Finding: load("mood", <a 4-label delta>) was accepted and classify then failed, the labels coming from
    the manifest's old entry. Now the labels travel with the delta; a delta without names may replace a task
    only with a head of the same shape; a refused load changes nothing."""
    rt = Runtime.open(labelled["dep"], threads=1)
    rt.activate("mood")
    before = rt.classify(TEXTS)
    four = labelled["dep"] / "tasks/topic/delta.safetensors"  # carries its 4 label names
    modules, head = read_delta(four)
    nameless = tmp_path / "nameless.safetensors"
    write_delta(nameless, modules, head, rt.manifest.base.fingerprint)  # the same 4-output head, no names
    with pytest.raises(DeltaError, match="4 outputs, task 'mood' has 2"):
        rt.load("mood", nameless)
    assert rt.active == "mood" and rt.classify(TEXTS) == before and rt.labels("mood") == LABELS["mood"]
    rt.load("mood", four)  # replaces the active task: weights, head and names together
    assert rt.labels("mood") == LABELS["topic"] and rt.classify(TEXTS) == rt.classify(TEXTS, task="topic")
    rt.load("mood", nameless, labels=["a", "b", "c", "d"])
    assert {label for label, _ in rt.classify(TEXTS)} <= {"a", "b", "c", "d"}
    with pytest.raises(DeltaError, match="2 label names for a head of 4"):
        rt.load("other", nameless, labels=["x", "y"])


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.float64])
def test_delta_tensors_must_be_float32(labelled, tmp_path, dtype):
    """Finding: a delta with int32 (or fp16) tensors was accepted and changed predictions."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    src = labelled["dep"] / "tasks/mood/delta.safetensors"
    with safe_open(str(src), "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = sorted(k for k in tensors if k.endswith("lora_A"))[0]
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, key: (tensors[key] * 100).astype(dtype)}, str(bad), meta)
    rt = Runtime.open(labelled["dep"], threads=1)
    with pytest.raises(DeltaError, match="float32 only"):
        rt.load("x", bad)
    assert "x" not in rt.tasks


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_w0_changed_after_export_is_refused(precision, labelled, tiny_dir, tmp_path, cli):
    """Finding: the swap's W0 was trusted blindly: one tensor scaled ×1.01 or a NaN gave confident wrong or NaN
    answers with exit 0. Now its bytes are hashed at open and its values checked finite. fp32 folders read W0
    where the engine's data file holds it (a manifest ``source``: those bytes are hashed); quantized ones
    from base/swap_w0.safetensors."""
    from edgelora.errors import DeploymentError

    dep = tmp_path / "dep"
    if precision == "fp32":
        shutil.copytree(labelled["dep"], dep)
    else:
        _export(tiny_dir("bert"), {"mood": labelled["mood"]}, dep, "--target", "cpu-int8")
    manifest = json.loads((dep / "manifest.json").read_text())
    name, weight = sorted(manifest["swap"]["weights"].items())[0]
    if weight.get("source"):
        rel, offset, length = weight["source"]["file"], weight["source"]["offset"], weight["source"]["length"]
    else:
        from edgelora.format.safetensors import parse

        rel = manifest["swap"]["w0"]
        raw = (dep / rel).read_bytes()
        tensors, _ = parse(raw, rel)
        length = tensors[name].nbytes
        offset = len(raw) - sum(t.nbytes for t in tensors.values()) + sum(
            t.nbytes for n, t in tensors.items() if n < name)  # tensors are stored in name order
    data = bytearray((dep / rel).read_bytes())
    w = np.frombuffer(bytes(data[offset:offset + length]), np.float32) * np.float32(1.01)
    data[offset:offset + length] = w.tobytes()
    (dep / rel).write_bytes(bytes(data))
    with pytest.raises(DeploymentError, match="does not match the sha256"):
        Runtime.open(dep)
    _cli_fails_in_one_line(cli, "run", dep, "--text", "hi", needle=Path(rel).name)
    data[offset:offset + 4] = np.float32(np.nan).tobytes()
    (dep / rel).write_bytes(bytes(data))
    _relist(dep, rel)  # hashes consistent with the NaN: the value check must catch it
    if weight.get("source"):
        manifest = json.loads((dep / "manifest.json").read_text())
        manifest["swap"]["weights"][name]["source"]["sha256"] = hashlib.sha256(data[offset:offset + length]).hexdigest()
        (dep / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match="not finite"):
        Runtime.open(dep)


def test_every_file_is_listed_with_its_size_and_sha256(dep, cli):
    """Finding: nothing in the folder was hashed or size-checked. Now the manifest lists every file (reports
    aside); open checks sizes and the files it reads; verify=True / `edgelora verify` hash the engines too."""
    from edgelora.errors import DeploymentError

    manifest = json.loads((dep / "manifest.json").read_text())
    on_disk = {p.relative_to(dep).as_posix() for p in dep.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "report.json", "report.md"}
    for rel, entry in manifest["files"].items():
        data = (dep / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    assert cli("verify", dep).code == 0
    engine = dep / "base/lora.onnx.data"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in a weight
    engine.write_bytes(bytes(data))
    Runtime.open(dep)  # the default open checks sizes only for engines (hashing them costs ~0.1 s per 180 MB)
    with pytest.raises(DeploymentError, match="lora.onnx.data.*sha256"):
        Runtime.open(dep, verify=True)
    _cli_fails_in_one_line(cli, "verify", dep, needle="lora.onnx.data")
    engine.write_bytes(bytes(data[:-100]))
    with pytest.raises(DeploymentError, match="lora.onnx.data.*bytes, the manifest says"):
        Runtime.open(dep)
    engine.write_bytes(bytes(data))
    _relist(dep, "base/lora.onnx.data")
    graph = dep / "base/swap.onnx"  # a graph file (it names its data file) is hashed at every open
    g = bytearray(graph.read_bytes())
    g[-5] ^= 0x01
    graph.write_bytes(bytes(g))
    with pytest.raises(DeploymentError, match="swap.onnx.*sha256"):
        Runtime.open(dep)


# ---------------------------------------------------------------------------------------------- folders that lie
@pytest.mark.parametrize("path", ["../mood/delta.safetensors", "/etc/hostname", "tasks/../../x", "tasks//x",
                                  "tasks\\x", "./tasks/x"])
def test_manifest_paths_outside_the_folder_are_refused(dep, path):
    """Finding: '../' and absolute paths in manifest.json were followed out of the folder."""
    manifest = json.loads((dep / "manifest.json").read_text())
    manifest["tasks"]["mood"]["delta"] = path
    (dep / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeloraError, match="not a plain path inside the deployment folder") as err:
        Runtime.open(dep)
    _one_line(err.value)


def test_symlinks_out_of_the_folder_are_refused_alike(dep, tmp_path):
    """Finding: a symlink under tasks/ was followed out of the folder, and the differing errors told whether a
    path existed. Now a link out is refused with the same message whatever its target is."""
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(dep / "tasks/mood/delta.safetensors", outside)
    messages = []
    for target in (outside, tmp_path / "does-not-exist"):
        link = dep / "tasks/mood/delta.safetensors"
        link.unlink()
        link.symlink_to(target)
        with pytest.raises(EdgeloraError) as err:
            Runtime.open(dep)
        messages.append(_one_line(err.value))
    assert messages[0] == messages[1] and "resolves outside the deployment folder" in messages[0]


def test_a_fifo_in_place_of_a_delta_is_refused_without_hanging(labelled, dep, cli):
    """Finding: a FIFO in place of a delta hung activate and `edgelora run`."""
    fifo = dep / "tasks/topic/delta.safetensors"
    fifo.unlink()
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            rt = Runtime.open(dep, threads=1)
            rt.activate("topic")
            result.append(None)
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert result, "opening a folder with a FIFO for a delta hung"
    assert isinstance(result[0], EdgeloraError) and "not a regular file" in str(result[0])
    _cli_fails_in_one_line(cli, "run", dep, "--text", "hi", needle="not a regular file")
    rt = Runtime.open(labelled["dep"], threads=1)  # and a FIFO handed to load()
    with pytest.raises(DeltaError, match="not a regular file"):
        rt.load("x", fifo)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(tasks=list(m["tasks"])), "tasks"),
    (lambda m: m["tasks"]["mood"].update(delta=5), "tasks.mood.delta"),
    (lambda m: m["base"].pop("io"), "base.io"),
    (lambda m: m["base"]["io"].update(inputs="input_ids"), "base.io.inputs"),
    (lambda m: m["base"].update(vocab_size="30522"), "base.vocab_size"),
    (lambda m: m["swap"]["weights"][next(iter(m["swap"]["weights"]))].update(shape=[2 ** 70, 1]), "swap.weights"),
    (lambda m: m["swap"]["weights"][next(iter(m["swap"]["weights"]))].update(recipe="int3"), "recipe"),
    (lambda m: m["files"][next(iter(m["files"]))].update(size=-1), "size"),
    (lambda m: m["files"].pop("tasks/mood/delta.safetensors"), "not in the files table"),
    (lambda m: m["tasks"]["mood"].update(labels=[1, 2]), "tasks.mood.labels"),
    (lambda m: m.update(format="3"), "format"),
    (lambda m: m.clear() or m.update(x=1), "format"),
])
def test_manifest_with_wrong_types_is_a_one_line_error(dep, cli, edit, field):
    """Finding: wrong JSON types in the manifest gave raw AttributeError/TypeError/OverflowError and CLI
    tracebacks. Now every one is an EdgeloraError naming the field, and the CLI exits 2 with one line."""
    manifest = json.loads((dep / "manifest.json").read_text())
    edit(manifest)
    (dep / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgeloraError) as err:
        Runtime.open(dep)
    assert field in _one_line(err.value)
    _cli_fails_in_one_line(cli, "run", dep, "--text", "hi", needle="manifest.json")


def test_safetensors_dimensions_of_2_70_are_refused(labelled, tmp_path):
    """Finding: a header dimension of 2**70 raised OverflowError."""
    import struct

    header = json.dumps({"__metadata__": {"format": "3"}, "x.lora_A": {"dtype": "F32", "shape": [2 ** 70, 4],
                                                                        "data_offsets": [0, 16]}}).encode()
    bad = tmp_path / "huge.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    rt = Runtime.open(labelled["dep"], threads=1)
    with pytest.raises(DeltaError, match="do not hold shape"):
        rt.load("huge", bad)


@pytest.mark.parametrize("rel, content, needle", [
    ("base/swap.onnx", b"\x08\x07garbage" * 100, "ONNX Runtime cannot load"),
    ("tokenizer/tokenizer.json", b'{"version": "1.0", "model": 5}', "tokenizers package cannot read"),
])
def test_garbage_engines_and_tokenizer_are_one_line_errors(dep, cli, rel, content, needle):
    """Finding: a garbage swap.onnx or tokenizer.json raised onnxruntime's or tokenizers' own exceptions. Here
    the manifest is made to agree with the garbage, so the file itself must be refused when used."""
    (dep / rel).write_bytes(content)
    _relist(dep, rel)
    with pytest.raises(EdgeloraError, match=needle) as err:
        Runtime.open(dep, threads=1).classify("hello")
    _one_line(err.value)
    _cli_fails_in_one_line(cli, "run", dep, "--task", "mood", "--text", "hi", needle=needle)


def test_truncated_engine_data_is_refused_at_open(dep, cli):
    """Finding: a truncated lora.onnx.data surfaced (if ever) as an onnxruntime error at the first mixed batch."""
    data = dep / "base/lora.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(EdgeloraError, match="changed or truncated"):
        Runtime.open(dep)
    _cli_fails_in_one_line(cli, "run", dep, "--text", "hi", needle="lora.onnx.data")


def test_deltas_are_validated_at_open(dep):
    """Finding: deltas were validated only at their first activate. A NaN in a delta the manifest vouches for
    (hash updated) is refused by open, naming the task's file."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    rel = "tasks/topic/delta.safetensors"
    with safe_open(str(dep / rel), "np") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = sorted(k for k in tensors if k.endswith("lora_B"))[0]
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    save_file(tensors, str(dep / rel), meta)
    _relist(dep, rel)
    with pytest.raises(DeltaError, match="topic/delta.safetensors.*Inf/NaN"):
        Runtime.open(dep)


# ---------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("inputs, needle", [
    ({"input_ids": np.array([[2, 5, -3]])}, "outside the vocabulary"),
    ({"input_ids": np.array([[2, 5, 128]])}, "outside the vocabulary"),
    ({"input_ids": np.array([[2.0, 5.7, 3.0]])}, "dtype float64"),
    ({"input_ids": np.zeros((1, 2, 3), np.int64)}, "has shape [1, 2, 3]"),
    ({"input_ids": np.zeros((1, 0), np.int64)}, "is empty"),
    ({"input_ids": [[2, 5, 3]], "attention_mask": [[1, 1]]}, "attention_mask has shape [1, 2]"),
    ({"input_ids": [[2, 5, 3]], "attention_mask": [[1, 2, 1]]}, "only 0 and 1"),
    ({"input_ids": np.full((1, 129), 7)}, "exceed the base's 128 positions"),
    ({"input_ids": [[2, 5, 3]], "token_type_ids": [[0, 1, 1]]}, "segments other than 0"),
    ({"input_ids": [[2, 5, 3]], "position_ids": [[0, 1, 2]]}, "unknown input(s) position_ids"),
    ({"text": ["fine", 5]}, "not a string"),
])
def test_run_checks_its_inputs(labelled, inputs, needle):
    """Finding: negative ids wrapped to the end of the vocabulary, float ids were truncated, and wrong ranks,
    empty sequences, ids ≥ vocab, masks of the wrong shape and too-long sequences gave raw onnxruntime
    errors. Now each is an InputError naming the input and the limit."""
    from edgelora.errors import InputError

    rt = Runtime.open(labelled["dep"], threads=1)
    rt.activate("mood")
    with pytest.raises(InputError) as err:
        rt.run(**inputs)
    assert needle in _one_line(err.value)


def test_what_tokenizers_return_is_accepted(labelled):
    """token_type_ids of zeros (what every BERT tokenizer returns) is accepted and changes nothing; classify([])
    is []; a text longer than the positions is truncated as transformers' truncation=True does."""
    from transformers import AutoTokenizer

    rt = Runtime.open(labelled["dep"], threads=1)
    rt.activate("topic")
    ids = np.array([[2, 40, 41, 42, 3]])
    plain = rt.run(input_ids=ids)["logits"]
    assert np.array_equal(rt.run(input_ids=ids, token_type_ids=np.zeros_like(ids))["logits"], plain)
    assert rt.classify([]) == []
    long = "a long review that keeps going " * 40
    tok = AutoTokenizer.from_pretrained(str(labelled["dep"] / "tokenizer"))
    enc = tok([long], truncation=True, max_length=128, return_tensors="np")
    assert enc["input_ids"].shape[1] == 128 and enc["input_ids"][0, -1] == tok.sep_token_id
    np.testing.assert_array_equal(rt.run(text=long)["logits"], rt.run(input_ids=enc["input_ids"])["logits"])


def test_generate_checks_the_context_length(exported):
    from edgelora.errors import InputError

    rt = Runtime.open(exported["llama"], threads=1)
    with pytest.raises(InputError, match="exceed the base's 128 positions"):
        rt.generate(np.full(120, 7), 16)
    assert len(rt.generate(np.full(120, 7), 8, task="t1")) == 8 and rt.active is None


# ---------------------------------------------------------------------------------------------- crashes, disks
def _export_cmd(base: Path, adapter: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "edgelora.cli", "export", "--base", str(base), "--adapter", f"t={adapter}",
            "--target", "cpu-int8", "-o", str(out), "-q", "--force"]


def test_kill_9_during_export_leaves_nothing_after_the_next_export(labelled, tiny_dir, tmp_path):
    """Finding: kill -9 during an export left its temp folder beside the output and its work folder in the
    system temp folder forever. Now both live in one locked folder that the next export removes. Five kills
    spread over an export (into a folder that already holds an older export: the --force swap is killed
    too); after the last, one complete export leaves the parent holding the output only, and TMPDIR as a
    finished export leaves it."""
    parent, tmpdir = tmp_path / "parent", tmp_path / "tmp"
    tmpdir.mkdir()
    out = parent / "out"
    env = {**os.environ, "TMPDIR": str(tmpdir), "HF_HUB_OFFLINE": "1"}
    cmd = _export_cmd(tiny_dir("bert"), labelled["mood"], out)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tmp_path)
    full = time.perf_counter() - t0
    clean = tree(tmpdir)  # what a finished export leaves in TMPDIR: torch's own caches, nothing of ours
    assert not any("edgelora" in p or "quant" in p for p in clean), clean
    left = []
    for k in range(5):  # kill when the export's work folder appears, then ever later into the export
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        t0 = time.perf_counter()
        while proc.poll() is None and len(list(parent.iterdir())) < 2:
            time.sleep(0.005)
        started = time.perf_counter() - t0
        time.sleep(max(full - started, 0.5) * 0.2 * k)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left.append(len(tree(parent)) + len(tree(tmpdir)))
        assert (out / "manifest.json").is_file() and Runtime.open(out).tasks == ["t"], k  # old or new, whole
    assert max(left) > len(tree(out)) + 1, left  # some kill left debris behind (else the test proves nothing)
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tmp_path)
    assert [p.name for p in parent.iterdir()] == ["out"] and tree(tmpdir) == clean


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing(labelled, tiny_dir, tmp_path):
    """Finding: a full disk gave a 31-line OSError traceback. On a file system half the size the export needs,
    it must end in one line, exit 2, and leave the file system empty."""
    full = tmp_path / "full"
    subprocess.run(_export_cmd(tiny_dir("bert"), labelled["mood"], full), check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    size = sum(p.stat().st_size for p in full.rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 2}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the full-disk path is untested on this machine")
    try:
        res = subprocess.run(_export_cmd(tiny_dir("bert"), labelled["mood"], mnt / "out"), capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert "no space left on the device" in res.stderr and "Traceback" not in res.stderr
        assert tree(mnt) == []
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)  # and a folder it may not write
        res = subprocess.run(_export_cmd(tiny_dir("bert"), labelled["mood"], mnt / "out"), capture_output=True,
                             text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert "cannot write output" in res.stderr and "Read-only file system" in res.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_eval_labels_outside_the_classes_are_refused(labelled, tiny_dir, tmp_path, cli):
    """Finding: --eval labels outside the adapter's classes (7, -1 for 2 labels) were accepted."""
    for bad in ("7", "-1"):
        f = tmp_path / f"eval{bad}.tsv"
        f.write_text(f"sentence\tlabel\nfine\t1\nbad\t{bad}\n")
        _cli_fails_in_one_line(cli, "export", "--base", tiny_dir("bert"), "--adapter", f"mood={labelled['mood']}",
                               "--eval", f"mood={f}", "-o", tmp_path / "o", needle=f"example 2 has label '{bad}'")
        assert not (tmp_path / "o").exists()


def test_a_target_named_like_a_path_is_refused(labelled, tiny_dir, tmp_path, cli):
    """Finding: a target file whose name is '../x' steered the default output folder outside out/."""
    t = tmp_path / "t.toml"
    t.write_text((REPO / "targets/cpu-fp32.toml").read_text().replace('name = "cpu-fp32"', 'name = "../x"'))
    _cli_fails_in_one_line(cli, "export", "--base", tiny_dir("bert"), "--adapter", f"mood={labelled['mood']}",
                           "--target", t, needle="name = '../x' must be a plain name")


# ---------------------------------------------------------------------------------------------- PEFT's defaults
@pytest.mark.parametrize("family, task_type, kw, labels", [
    ("bert", "SEQ_CLS", {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}, 3),
    ("gpt2", "CAUSAL_LM", {"target_modules": ["c_attn"], "fan_in_fan_out": True}, None),
    ("llama", "CAUSAL_LM", {"target_modules": ["q_proj", "v_proj"]}, None),
])
@pytest.mark.parametrize("auto_mapping", [True, False], ids=["auto_mapping", "names only"])
def test_adapters_saved_without_task_type_merge_and_export_like_peft(family, task_type, kw, labels, auto_mapping,
                                                                      tiny_dir, tmp_path, cli):
    """Finding: adapters saved by get_peft_model(model, LoraConfig(...)) without task_type — PEFT's default —
    failed merge and export ("not in the base model (BertModel)"). Now the task comes from what the adapter and
    base say (PEFT's auto_mapping, else the module names and the base's architectures); merge equals PEFT's
    merge_and_unload on that model, and so does the exported engine."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = tiny_dir(family)
    num = {"num_labels": labels} if labels else {}
    torch.manual_seed(3)
    model = load_task_model(base, task_type, **num)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.1)  # a trained-looking head
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config.get("task_type") is None and config.get("auto_mapping")
    if not auto_mapping:
        config.pop("auto_mapping")
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    ref = PeftModel.from_pretrained(load_task_model(base, task_type, **num), str(adapter)).merge_and_unload().eval()
    ids = torch.randint(6, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    res = cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert res.code == 0, res.err
    assert "has no task_type" in res.err and ("auto_mapping" in res.err) == auto_mapping
    merged = load_task_model(tmp_path / "merged", task_type)
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (got - want).abs().max().item() <= 1e-5
    res = cli("export", "--base", base, "--adapter", f"t={adapter}", "-o", tmp_path / "dep", "-q")
    assert res.code == 0, res.err
    rt = Runtime.open(tmp_path / "dep", threads=1)
    out = rt.run(input_ids=ids.numpy(), task="t")["logits"]
    assert np.abs(out - want.numpy()).max() <= 1e-4
