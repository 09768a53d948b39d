"""Acceptance 3: every bad input -> one line naming the file/key/shape and the fix, exit 2,
no traceback, nothing left on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_peft_adapter, tree
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def good_adapter(tiny_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_dir("bert"), tmp_path_factory.mktemp("good") / "adapter",
                             task_type="FEATURE_EXTRACTION", r=4, target_modules=["query", "value"])


@pytest.fixture
def adapter(good_adapter, tmp_path) -> Path:
    """A fresh, writable copy of a valid adapter for one test to break."""
    dst = tmp_path / "in" / "adapter"
    shutil.copytree(good_adapter, dst)
    return dst


def _edit_tensors(folder: Path, fn) -> None:
    f = folder / "adapter_model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def _edit_config(folder: Path, fn) -> None:
    f = folder / "adapter_config.json"
    cfg = json.loads(f.read_text())
    fn(cfg)
    f.write_text(json.dumps(cfg))


def _first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _nan_in_a(t):
    t[_first(t, "lora_A")][0, 0] = float("nan")


def _inf_in_b(t):
    t[_first(t, "lora_B")][1, 1] = float("inf")


def _int_dtype(t):
    k = _first(t, "lora_A")
    t[k] = (t[k] * 100).to(torch.int8)


def _wrong_shape(t):
    k = _first(t, "lora_A")
    t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 3)


def _rank_zero_tensors(t):
    for k in [k for k in t if "layer.0.attention.self.query" in k]:
        t[k] = torch.zeros(0, t[k].shape[1]) if "lora_A" in k else torch.zeros(t[k].shape[0], 0)


def _unknown_module(t):
    k = _first(t, "lora_A")
    t[k.replace("attention.self.query", "attention.self.nonexistent")] = t[k].clone()
    kb = k.replace("lora_A", "lora_B")
    t[kb.replace("attention.self.query", "attention.self.nonexistent")] = t[kb].clone()


def _truncate(folder: Path):
    f = folder / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _garbage(folder: Path):
    (folder / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")


def _pickle_only(folder: Path):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")


BREAKS = {
    # name: (how to break the adapter folder, words the one-line message must contain)
    "missing folder": (lambda f: shutil.rmtree(f), ["does not exist"]),
    "missing weights": (lambda f: (f / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors"]),
    "missing config": (lambda f: (f / "adapter_config.json").unlink(), ["adapter_config.json"]),
    "truncated safetensors": (_truncate, ["adapter_model.safetensors", "truncated or corrupt"]),
    "corrupt safetensors": (_garbage, ["adapter_model.safetensors", "corrupt"]),
    "config not JSON": (lambda f: (f / "adapter_config.json").write_text("{r: 4,"), ["adapter_config.json",
                                                                                      "not valid JSON"]),
    "config lacks r": (lambda f: _edit_config(f, lambda c: c.pop("r")), ["adapter_config.json", "'r'"]),
    "config rank 0": (lambda f: _edit_config(f, lambda c: c.update(r=0)), ["'r' is 0", "≥ 1"]),
    "tensor rank 0": (lambda f: _edit_tensors(f, _rank_zero_tensors), ["rank 0", "layer.0.attention.self.query"]),
    "module not in base": (lambda f: _edit_tensors(f, _unknown_module), ["nonexistent", "not in the base"]),
    "A/B shape mismatch": (lambda f: _edit_tensors(f, _wrong_shape), ["do not fit the base weight", "expected A"]),
    "NaN in A": (lambda f: _edit_tensors(f, _nan_in_a), ["lora_A", "NaN or Inf"]),
    "Inf in B": (lambda f: _edit_tensors(f, _inf_in_b), ["lora_B", "NaN or Inf"]),
    "non-float dtype": (lambda f: _edit_tensors(f, _int_dtype), ["int8", "must be float"]),
    "pickle without opt-in": (_pickle_only, ["adapter_model.bin", "--allow-pickle"]),
}


def _assert_one_line_error(res, words) -> None:
    assert res.code == 2, (res.code, res.err)
    lines = [line for line in res.err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.err
    assert "Traceback" not in res.err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("case", list(BREAKS))
@pytest.mark.parametrize("command", ["merge", "inspect"])
def test_bad_adapter(case, command, adapter, tiny_dir, tmp_path, cli):
    breaker, words = BREAKS[case]
    breaker(adapter)
    out = tmp_path / "out" / "merged"
    before = tree(tmp_path)
    if command == "merge":
        res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", out)
    else:
        res = cli("inspect", adapter, "--base", tiny_dir("bert"))
    _assert_one_line_error(res, words)
    assert tree(tmp_path) == before  # no output folder, no temp folder


def test_output_exists_and_is_not_empty(adapter, tiny_dir, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", out)
    _assert_one_line_error(res, [str(out), "--force"])
    assert tree(out) == ["keep.txt"]
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", out, "--force")
    _assert_one_line_error(res, [str(out), "not made by edgelora"])  # --force replaces only edgelora's folders
    assert tree(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", out).code == 0
    (out / "stale.txt").write_text("from an earlier merge")
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", out, "--force")
    assert res.code == 0, res.err
    assert "stale.txt" not in tree(out) and "model.safetensors" in tree(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no temp folders left


def test_base_problems(adapter, tiny_dir, tmp_path, cli):
    out = tmp_path / "o"
    _assert_one_line_error(cli("merge", "--base", tmp_path / "nope", "--adapter", adapter, "-o", out),
                           ["nope", "does not exist"])
    pickled = tmp_path / "pickled_base"
    shutil.copytree(tiny_dir("bert"), pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    _assert_one_line_error(cli("merge", "--base", pickled, "--adapter", adapter, "-o", out),
                           ["pytorch_model.bin", "safetensors"])
    _assert_one_line_error(cli("merge", "--base", tiny_dir("llama"), "--adapter", adapter, "-o", out),
                           ["not in the base model"])
    assert not out.exists()


def test_adapter_trained_on_another_base_is_refused(adapter, tiny_dir, tmp_path, cli):
    (adapter / "edgelora.json").write_text(json.dumps({"format": 1, "base_fingerprint": "0" * 64, "base": "other"}))
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", tmp_path / "o")
    _assert_one_line_error(res, ["trained on base other", "fingerprint"])
    assert not (tmp_path / "o").exists()


def test_merged_folder_is_not_a_base_for_another_merge(adapter, tiny_dir, tmp_path, cli):
    assert cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", tmp_path / "m1").code == 0
    res = cli("merge", "--base", tmp_path / "m1", "--adapter", adapter, "-o", tmp_path / "m2")
    _assert_one_line_error(res, ["already has an adapter merged"])
    assert not (tmp_path / "m2").exists()


def test_pickle_with_opt_in_merges(adapter, tiny_dir, tmp_path, cli):
    _pickle_only(adapter)
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", tmp_path / "m", "--allow-pickle")
    assert res.code == 0, res.err


def test_unwritable_output(adapter, tiny_dir, tmp_path, cli):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", blocker / "sub")
    _assert_one_line_error(res, ["cannot write output"])


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("edgelora")
    res = subprocess.run([str(exe), "merge", "--adapter", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: adapter folder {tmp_path / 'missing'} does not exist; "
                                               "check the path"]
    assert not (tmp_path / "o").exists()


def test_output_folder_has_normal_permissions(adapter, tiny_dir, tmp_path, cli):
    import os
    import stat

    assert cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", tmp_path / "m").code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
