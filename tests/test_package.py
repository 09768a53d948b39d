"""The distribution: a non-editable wheel installs edgelora with converters under its namespace,
package data included, and its command works from the installed copy."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, text=True)
    [whl] = list(out.glob("edgelora-*.whl"))
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "edgelora/py.typed" in names
    assert "edgelora/converters/__init__.py" in names
    assert "edgelora/cli.py" in names
    assert "edgelora/pipeline/pipeline.schema.json" in names and "edgelora/converters/tensorrt/plan.py" in names
    assert not any(n.startswith(("converters/", "tests/", "benchmarks/")) for n in names)
    toml = sorted(n for n in names if n.startswith("edgelora/targets/") and n.endswith(".toml"))
    assert toml == sorted(f"edgelora/targets/{p.name}" for p in (REPO / "targets").glob("*.toml"))


def test_installed_wheel_runs_from_its_own_copy(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import edgelora, edgelora.converters, edgelora.cli, edgelora.format, edgelora.runtime; "
            "print(edgelora.__file__); print(edgelora.converters.__file__); print(edgelora.format.__file__); "
            "print(edgelora.runtime.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, check=True, capture_output=True,
                         text=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in out), out
    res = subprocess.run([sys.executable, "-m", "edgelora.cli", "inspect", str(REPO / "examples/adapters/sst2"),
                          "--json"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert '"rank": 8' in res.stdout


@pytest.mark.slow
def test_the_wheel_in_a_fresh_venv_exports_with_no_arguments(wheel, tmp_path):
    """`pip install edgelora-*.whl` into a new virtual environment (its dependencies from the package index, torch
    pinned by constraints.txt as CI pins it), then `edgelora export` with no arguments, outside the checkout: the
    bundled base and the example adapters shipped in the wheel, verified and written to out/cpu-fp32; then the
    on-device runtime of that install classifies with it. ~1 min (the pip cache and the local torch file help)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"),
                          str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | {"HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(venv / "bin/edgelora"), "export", "-q"], cwd=work, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "out/cpu-fp32/manifest.json").is_file() and "sst2" in res.stdout and "agnews" in res.stdout
    res = subprocess.run([str(venv / "bin/edgelora"), "run", "out/cpu-fp32", "--task", "sst2", "--text",
                          "a gorgeous, witty, seductive movie", "--json"], cwd=work, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert '"label": "positive"' in res.stdout
    where = subprocess.run([str(venv / "bin/python"), "-c", "import edgelora; print(edgelora.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True).stdout
    assert Path(where.strip()).is_relative_to(venv), where
    # edgelora build from the installed copy: the example adapters shipped in the wheel, one target, an eval set
    examples = subprocess.run([str(venv / "bin/python"), "-c", "from edgelora.export import example_adapters_dir; "
                               "print(example_adapters_dir())"], cwd=work, env=env, capture_output=True,
                              text=True).stdout.strip()
    (work / "PIPELINE.toml").write_text(
        f'targets = ["cpu-int8"]\n[gates]\nmax_accuracy_drop = 1.0\n'
        f'[tasks.sst2]\nadapter = "{examples}/sst2"\neval = "{REPO / "examples/data/sst2-dev-500.tsv"}"\n'
        f'[tasks.agnews]\nadapter = "{examples}/agnews"\neval = "{REPO / "examples/data/agnews-val-500.tsv"}"\n')
    res = subprocess.run([str(venv / "bin/edgelora"), "build", "PIPELINE.toml", "-q"], cwd=work, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sst2/cpu-int8" in res.stdout and (work / "build/engines/cpu-int8/manifest.json").is_file()
    assert (work / "build/engines/charts/accuracy.png").is_file()
