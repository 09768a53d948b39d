"""int8 that is right on every CPU: the pair-safe weight recipe, the CPU's int8 path, and the AVX2 kernels run for
real under QEMU's user-mode emulation of a Haswell (AVX2, no AVX-512, no VNNI) when ``qemu-x86_64`` is here.

AVX2 CPUs without VNNI add each pair of u8·s8 products along K into a saturating 16-bit lane; VNNI, AMX and ARM
accumulate in 32 bits. The references are exact integer products computed in int64 by numpy."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgelora.lora import INT8_LEVELS, PAIR_LIMIT, SATURATING_PAIR, int8_per_column, int8_per_column_into, max_pair_sum
from edgelora.runtime.cpu import int8_path, kernel_saturates

REPO = Path(__file__).resolve().parents[1]

QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                                reason="qemu-x86_64 (Debian qemu-user) is not installed: the AVX2 kernels are "
                                       "exercised only on an AVX2 machine then")


def _matmul_integer(b: np.ndarray) -> bytes:
    """One MatMulInteger: uint8 A (1, K) times the constant int8 weight ``b`` (K, N) -> int32 (1, N)."""
    k, n = b.shape
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, n])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _kernel(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(_matmul_integer(b), providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def _weights(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Trained-looking weights with outliers (the columns a pair bound bites on)."""
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    w[rng.integers(0, shape[0], 8), rng.integers(0, shape[1], 8)] *= 12
    return w


@pytest.mark.parametrize("k", [1, 2, 7, 64, 385])
def test_pairsafe_recipe_keeps_every_pair_under_the_saturation_bound(k):
    rng = np.random.default_rng(k)
    for w in (_weights(rng, (k, 33)), rng.uniform(-1, 1, (k, 33)).astype(np.float32),
              np.full((k, 3), 0.7, np.float32), np.zeros((k, 2), np.float32)):
        q, scale = int8_per_column(w, "int8-pairsafe")
        assert max_pair_sum(q) <= PAIR_LIMIT and 255 * max_pair_sum(q) <= SATURATING_PAIR
        assert np.abs(q).max() <= 127 and scale.dtype == np.float32
        # the in-place form the runtime's swap uses is the same arithmetic
        q2 = np.empty_like(q)
        assert np.array_equal(int8_per_column_into(w.copy(), q2, "int8-pairsafe"), scale) and np.array_equal(q2, q)
        # the rounding error stays within half a step of the recipe's own scale
        assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)
    full, _ = int8_per_column(rng.uniform(-1, 1, (64, 8)).astype(np.float32), "int8")
    assert max_pair_sum(full) > PAIR_LIMIT  # the quantizer's full range does not hold the bound


def test_pairsafe_costs_less_precision_than_reduce_range_on_trained_like_weights():
    rng = np.random.default_rng(0)
    w = _weights(rng, (384, 384))
    err = {r: float(np.linalg.norm(np.multiply(*int8_per_column(w, r)) - w)) for r in INT8_LEVELS}
    assert err["int8"] < err["int8-pairsafe"] < err["int8-reduced"]


def test_the_int8_path_printed_matches_what_the_kernel_here_does():
    """The detection by CPU flags agrees with ONNX Runtime's kernel on this machine: a full-range pair of
    255·127 products saturates exactly where the path says it does, and pair-safe weights are exact anyway."""
    k = 64
    a = np.full((1, k), 255, np.uint8)
    full = np.full((k, 4), 127, np.int8)
    exact = a.astype(np.int64) @ full.astype(np.int64)
    saturated = not np.array_equal(_kernel(full, a), exact)
    assert saturated == int8_path().saturates == kernel_saturates(), int8_path().line()
    rng = np.random.default_rng(1)
    q, _ = int8_per_column(_weights(rng, (k, 16)), "int8-pairsafe")
    a = rng.integers(200, 256, (3, k)).astype(np.uint8)
    assert np.array_equal(_kernel(q, a), a.astype(np.int64) @ q.astype(np.int64))


def test_int8_path_by_flags():
    assert int8_path({"avx2", "fma"}, "x86_64").saturates
    assert int8_path({"avx2", "avx512f", "avx512bw"}, "x86_64").saturates
    assert not int8_path({"avx2", "avx512bw", "avx512_vnni"}, "x86_64").saturates
    assert not int8_path({"avx2", "avx_vnni"}, "x86_64").saturates
    assert int8_path({"avx2", "amx_int8"}, "x86_64").kernel == "AMX"
    assert not int8_path({"asimddp"}, "aarch64").saturates


@pytest.fixture(scope="module")
def int8_folders(family_adapters, tmp_path_factory):
    """The tiny BERT's two tasks exported to cpu-int8 (pair-safe) and to the same target with the quantizer's full
    range (what cpu-int8 shipped before): recipe -> (folder or None where the export refused it, CLI result)."""
    from edgelora.cli import main

    base, adapters = family_adapters["bert"]
    root = tmp_path_factory.mktemp("int8_cpus")
    full = root / "full.toml"
    text = (REPO / "targets" / "cpu-int8.toml").read_text()
    full.write_text(text.replace('name = "cpu-int8"', 'name = "cpu-int8-full"').replace("pair_safe = true",
                                                                                          "pair_safe = false"))
    out = {}
    for recipe, target in (("int8-pairsafe", "cpu-int8"), ("int8", str(full))):
        dst = root / recipe
        args = ["export", "--base", str(base), "--target", target, "-o", str(dst), "-q"]
        for name, path in adapters.items():
            args += ["--adapter", f"{name}={path}"]
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        out[recipe] = (dst if code == 0 else None, code)
    return out


def test_an_int8_export_holds_only_pair_safe_integer_weights(int8_folders):
    """Every integer MatMul weight in every engine of a cpu-int8 folder, and the runtime's swapped weights after
    each task's activate, keep the bound; the manifest names the recipe."""
    from edgelora.converters.onnx.quantize import integer_weights

    from edgelora.runtime import Runtime

    out, code = int8_folders["int8-pairsafe"]
    assert code == 0 and out is not None
    checked = 0
    for engine in sorted((out / "base").glob("*.onnx")):
        model = onnx.load(str(engine))
        inits = {i.name: i for i in model.graph.initializer}
        for name in integer_weights(model):
            if name in inits:
                assert max_pair_sum(numpy_helper.to_array(inits[name])) <= PAIR_LIMIT, (engine.name, name)
                checked += 1
    assert checked > 0
    rt = Runtime.open(out)
    recipes = {w.recipe for w in rt.manifest.swap.weights.values()} if rt.manifest.swap else set()
    assert recipes <= {"int8-pairsafe"}
    for task in rt.tasks:
        rt.activate(task)
        if rt.mode == "swap":
            for slot in rt._swap.slots:
                for key, arr in slot.arrays.items():
                    if arr.dtype == np.int8:
                        assert max_pair_sum(arr) <= PAIR_LIMIT, (task, key)


def test_a_full_range_folder_is_caught_where_the_kernel_saturates(int8_folders):
    """The quantizer's full range on random tiny weights: right on a VNNI/AMX/ARM kernel, wrong on AVX2 without
    VNNI. Here the export's own conformance check decides: it writes the folder only where this CPU gets it
    right, and refuses it (exit 1, nothing written) where this CPU saturates."""
    out, code = int8_folders["int8"]
    if kernel_saturates():
        assert code == 1 and out is None
    else:
        assert code == 0 and out is not None


def _verify_under_haswell(folder: Path) -> subprocess.CompletedProcess:
    """``edgelora verify --conformance`` run by ONNX Runtime's AVX2 kernels: the device an AVX2-only CPU is."""
    return subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-m", "edgelora.cli", "verify", "--conformance",
                           str(folder)], capture_output=True, text=True, timeout=600)


@needs_qemu
def test_the_conformance_check_on_an_emulated_avx2_cpu(int8_folders):
    """The folder's reference vectors re-run on an AVX2 CPU without VNNI (QEMU's Haswell): the pair-safe folder
    passes there; the full-range one, which passes here on a kernel that does not saturate, fails there, naming
    the task and the bound."""
    out, _ = int8_folders["int8-pairsafe"]
    res = _verify_under_haswell(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "saturating" in res.stdout and "checks passed" in res.stdout
    full, _ = int8_folders["int8"]
    if full is None:
        pytest.skip("this CPU saturates: the full-range export was refused here already (the test above)")
    res = _verify_under_haswell(full)
    assert res.returncode == 1, res.stdout[-3000:]
    err = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "conformance failed" in err[0] and "agreement" in err[0], res.stderr[-2000:]


_PROBE = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_int8_cpus import _kernel, _weights
    from edgelora.lora import int8_per_column
    from edgelora.runtime.cpu import kernel_saturates
    a = np.full((1, 64), 255, np.uint8)
    full = np.full((64, 4), 127, np.int8)
    rng = np.random.default_rng(1)
    q, _ = int8_per_column(_weights(rng, (64, 16)), "int8-pairsafe")
    print(kernel_saturates())
    print(int(_kernel(full, a)[0, 0]), int(a[0].astype(np.int64) @ full[:, 0].astype(np.int64)))
    print(bool(np.array_equal(_kernel(q, a), a.astype(np.int64) @ q.astype(np.int64))))
""")


@needs_qemu
def test_avx2_kernels_under_qemu_saturate_full_range_and_not_pair_safe(tmp_path):
    """ONNX Runtime's own AVX2 u8·s8 kernel, run in a Haswell emulated by QEMU: full-range weights come back
    saturated (1,048,544 for 2,072,640), pair-safe weights exactly."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), str(Path(__file__).parent)])}
    res = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    measured, sums, pairsafe = res.stdout.strip().splitlines()[-3:]
    assert measured == "True"  # the runtime's probe sees the emulated kernel (the flags it reads are the host's)
    got, want = map(int, sums.split())
    assert (got, want) == (1048544, 2072640)
    assert pairsafe == "True"
