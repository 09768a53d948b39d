"""The executorch-xnnpack target on a tiny seeded BERT with two PEFT classification adapters (2 and 4 labels):
the folder's programs run by ExecuTorch's own Python runtime against PEFT in PyTorch, the shared base.ptd, the
manifest's sizes and hashes, and the one-line errors (no executorch installed, a request it cannot serve)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_labelled_adapters, peft_reference, tree

pytest.importorskip("executorch.runtime", reason="executorch is an optional extra: pip install 'edgelora[executorch]'")

LABELS = {"pos": ["negative", "positive"], "topic": ["world", "sports", "business", "science"]}


@pytest.fixture(scope="module")
def deployment(tiny_dir, tmp_path_factory):
    from click.testing import CliRunner

    from edgelora.cli import main

    base = tiny_dir("bert")
    root = tmp_path_factory.mktemp("et")
    adapters = make_labelled_adapters(base, root / "adapters", LABELS)
    out = root / "out"
    args = ["export", "--base", base, "--target", "executorch-xnnpack", "-o", out, "-q", "--json",
            *[a for name, p in adapters.items() for a in ("--adapter", f"{name}={p}")]]
    with CliRunner().isolation() as streams:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        err = streams[1].getvalue().decode()
    assert code == 0, err
    return base, adapters, out


def _ids(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(6, 128, size=(1, 128), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[:, 100:] = 0
    return ids, mask


def _peft_logits(base: Path, adapter: Path, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unmerged, merged = peft_reference(base, adapter, "SEQ_CLS", num_labels=len(LABELS[adapter.name]))
    with torch.no_grad():
        feed = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        return unmerged(**feed).logits.numpy(), merged(**feed).logits.numpy()


def test_programs_match_peft_through_the_executorch_runtime(deployment):
    """Inputs the export never saw, run by ExecuTorch: each merged .pte and the one branch program fed the
    task's delta agree with PEFT (unmerged and merge_and_unload) within fp32's 1e-4."""
    from edgelora.converters.executorch import export as et_export
    from edgelora.converters.executorch import runner

    from edgelora.format.delta import read_delta

    base, adapters, out = deployment
    manifest = json.loads((out / "manifest.json").read_text())
    ids, mask = _ids()
    branch = runner.load(out / "lora.pte", out / "base.ptd")
    br = manifest["branches"]
    for name, adapter in adapters.items():
        task = manifest["tasks"][name]
        unmerged, merged = _peft_logits(base, adapter, ids, mask)
        assert np.abs(unmerged - merged).max() < 1e-5
        got = runner.run(runner.load(out / task["program"], out / "base.ptd"), [ids, mask])
        assert got.shape == merged.shape
        assert np.abs(got - merged).max() <= 1e-4
        modules, head = read_delta(out / task["delta"])
        feeds = et_export.branch_feeds(modules, br["modules"], br["ranks"], head, br["labels"])
        got = runner.run(branch, [ids, mask, *feeds])[..., :task["labels"]]
        assert np.abs(got - unmerged).max() <= 1e-4
    assert br["labels"] == 4  # the head is padded to the most labels; the 2-label task reads its first two


def test_folder_shares_one_base_data_file_and_lists_every_file(deployment):
    _, adapters, out = deployment
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert sorted(p for p in tree(out) if p.endswith((".pte", ".ptd"))) == [
        "base.ptd", "lora.pte", "tasks/pos/merged.pte", "tasks/topic/merged.pte"]
    for rel, entry in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    ptd = (out / "base.ptd").stat().st_size
    for name in adapters:
        task = report["tasks"][name]
        # per task only what differs: far less than the base's weights (merged targets + head, or A, B + head)
        assert task["engine_size_bytes"] < ptd and task["branches"]["task_bytes"] < task["engine_size_bytes"]
        assert task["max_abs_diff"] <= 1e-4 and task["branches"]["max_abs_diff"] <= 1e-4
        assert task["latency_ms"] > 0 and task["branches"]["latency_ms"] > 0
    assert report["switch"]["load_merged_program_ms"] > 0 and report["switch"]["feed_branches_ms"] > 0


def test_without_executorch_the_export_is_one_line_and_writes_nothing(tmp_path):
    """executorch made unimportable in a fresh interpreter: exit 2, one line naming the fix, no folder."""
    out = tmp_path / "out"
    code = ("import sys; sys.modules['executorch'] = None\n"
            "from edgelora.cli import main\n"
            f"main(['export', '--target', 'executorch-xnnpack', '-o', {str(out)!r}, '-q'])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "executorch is not installed" in lines[0], res.stderr
    assert "pip install 'edgelora[executorch]'" in lines[0]
    assert not out.exists() and tree(tmp_path) == []


def test_a_request_it_cannot_serve_is_one_line_and_leaves_nothing(tiny_dir, tmp_path, cli):
    """--eval is refused inside the export's temporary folder: one line, exit 2, nothing left beside it."""
    base = tiny_dir("bert")
    adapters = make_labelled_adapters(base, tmp_path / "a", {"pos": LABELS["pos"]})
    evals = tmp_path / "e.tsv"
    evals.write_text("text\tlabel\ngood\t1\n")
    out = tmp_path / "o" / "out"
    res = cli("export", "--base", base, "--target", "executorch-xnnpack", "-o", out, "-q",
              "--adapter", f"pos={adapters['pos']}", "--eval", f"pos={evals}")
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1 and "--eval is not supported" in res.err
    assert tree(tmp_path / "o") == []


@pytest.fixture(scope="module")
def beside(deployment, tmp_path_factory):
    """cpu-fp32 (ONNX Runtime) over the same tiny base and adapters: what `edgelora bench --beside` times."""
    from edgelora.export import export
    from edgelora.target import load_target

    base, adapters, _ = deployment
    out = tmp_path_factory.mktemp("ort") / "cpu-fp32"
    export(base, adapters, load_target("cpu-fp32"), out, threads=1, latency_runs=3)
    return out


def test_bench_times_both_forms_beside_onnx_runtime(deployment, beside, cli):
    """`edgelora bench DIR --beside CPU_FP32`: per task both ExecuTorch forms and ONNX Runtime's fp32 engine on
    the same inputs, each form's file, parity against PEFT in PyTorch and ONNX Runtime, switch times, the CPU."""
    _, adapters, out = deployment
    res = cli("bench", out, "--beside", beside, "--rounds", "1", "--threads", "1", "--json",
              *[a for name, p in adapters.items() for a in ("--adapter", f"{name}={p}")])
    assert res.code == 0, res.err
    r = json.loads(res.out)
    assert r["backend"] == "executorch" and r["target"] == "executorch-xnnpack" and r["beside"] == str(beside)
    assert r["cpu"]["model"] and isinstance(r["cpu"]["flags"], list) and r["shape"] == "batch 1 × 128 tokens"
    ptd = (out / "base.ptd").stat().st_size
    assert r["bytes"] == {"base_ptd": ptd, "branch_pte": (out / "lora.pte").stat().st_size}
    assert set(r["tasks"]) == set(adapters)
    for name, t in r["tasks"].items():
        lat = t["latency_ms"]
        assert set(lat) == {"et_merged", "et_branches", "ort_fp32"}
        assert all(0 < v < 10_000 for v in lat.values()), lat
        b = t["bytes"]
        assert b["et_merged_pte"] == (out / f"tasks/{name}/merged.pte").stat().st_size
        assert b["et_delta"] == (out / f"tasks/{name}/delta.safetensors").stat().st_size
        assert b["et_delta"] < b["et_merged_pte"] < ptd and b["ort_engine"] > 0 and b["ort_delta"] > 0
        for kind in ("vs_pytorch", "export", "vs_ort"):  # PEFT unmerged live, PEFT merged at export, ORT fp32
            assert set(t["max_abs_diff"][kind]) == {"merged", "branches"}, kind
            assert all(0 <= v <= 1e-4 for v in t["max_abs_diff"][kind].values()), (kind, t["max_abs_diff"])
    sw = r["switch_ms"]
    assert set(sw) == {"et_load_merged_program", "et_feed_branches", "ort_runtime_activate", "ort_fresh_session"}
    assert all(0 < v < 60_000 for v in sw.values()), sw

    text = cli("bench", out, "--beside", beside, "--rounds", "1", "--threads", "1", "--no-peft")
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[1].startswith("CPU: ") and "flags:" in lines[1]
    for name in adapters:
        rows = [ln for ln in lines if ln.startswith(name)]
        assert [e for e in ("ORT fp32 baked engine", "ET merged .pte", "ET branches") if any(e in x for x in rows)] \
            == ["ORT fp32 baked engine", "ET merged .pte", "ET branches"], rows
    assert "ET load merged program over base.ptd" in text.out and "ORT runtime activate" in text.out


def test_bench_alone_and_its_one_line_refusals(deployment, beside, cli):
    """Without --beside: the ExecuTorch rows only. --beside on an ONNX Runtime folder, or naming a folder that
    is not cpu-fp32: one line, exit 2."""
    _, adapters, out = deployment
    res = cli("bench", out, "--rounds", "1", "--threads", "1", "--no-peft", "--json")
    assert res.code == 0, res.err
    r = json.loads(res.out)
    assert r["beside"] is None and set(r["switch_ms"]) == {"et_load_merged_program", "et_feed_branches"}
    for t in r["tasks"].values():
        assert set(t["latency_ms"]) == {"et_merged", "et_branches"} and t["max_abs_diff"]["vs_pytorch"] == {}
        assert set(t["bytes"]) == {"et_merged_pte", "et_delta"}
    for args, says in [((beside, "--beside", out), "--beside is for an ExecuTorch folder"),
                       ((out, "--beside", out), "is an ExecuTorch folder; pass a cpu-fp32 folder")]:
        bad = cli("bench", *args, "--rounds", "1", "--no-peft")
        assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1 and says in bad.err, bad.err
