"""The base fingerprint: sha256 over the weights, stable across runs and file layouts."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import load_task_model
from safetensors.torch import load_file, save_file

from edgelora.base import bundled_base_path, fingerprint
from edgelora.hashing import hash_tensors


def test_file_and_memory_digests_agree(tiny_dir):
    folder = tiny_dir("qwen2")
    assert fingerprint(folder) == hash_tensors(load_file(str(folder / "model.safetensors")))


def test_stable_across_processes():
    code = "from edgelora.base import bundled_base_path, fingerprint; print(fingerprint(bundled_base_path()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == fingerprint(bundled_base_path())
    assert len(out) == 64


def test_independent_of_sharding(tiny_dir, tmp_path):
    folder = tiny_dir("llama")
    model = load_task_model(folder, "CAUSAL_LM")
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert fingerprint(tmp_path / "sharded") == fingerprint(folder)


def test_one_ulp_changes_it(tiny_dir, tmp_path):
    import shutil

    folder = shutil.copytree(tiny_dir("bert"), tmp_path / "b")
    before = fingerprint(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key].view(-1)[0] = torch.nextafter(tensors[key].view(-1)[0], torch.tensor(1e9))
    save_file(tensors, str(folder / "model.safetensors"), {"format": "pt"})
    assert fingerprint(folder) != before
