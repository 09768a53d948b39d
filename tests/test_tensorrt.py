"""The TensorRT backend, the parts that run without a GPU: the build plan of an exported fp16 folder (refittable
LoRA-target weights, profiles, flags), the check of a built engine's refit prototypes, the one-line refusal where
TensorRT cannot run. The GPU tests build a tiny engine (scripts/gpu-check runs them on a GPU machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgelora.errors import EdgeloraError
from edgelora.target import load_target

REPO = Path(__file__).resolve().parents[1]


def _cpu_fp16(tmp: Path) -> Path:
    """cuda-fp16 on the CPU provider: the same fp16 graph, exportable without a GPU."""
    text = (REPO / "targets" / "cuda-fp16.toml").read_text()
    text = text.replace('"CUDAExecutionProvider"', '"CPUExecutionProvider"')
    path = tmp / "cpu-fp16.toml"
    path.write_text(text.replace('"cuda-fp16"', '"cpu-fp16"'))
    return path


@pytest.fixture(scope="module")
def fp16_folders(family_adapters, tmp_path_factory):
    """A BERT (sequence classification) and a LLaMA (causal LM) folder exported at fp16."""
    from edgelora.export import export

    root = tmp_path_factory.mktemp("trt")
    target = load_target(_cpu_fp16(root))
    out = {}
    for family in ("bert", "llama"):
        base, adapters = family_adapters[family]
        out[family] = root / family
        export(base, adapters, target, out[family], threads=1, latency_runs=2)
    return out


def _onnx_initializers(path: Path) -> dict[str, tuple[int, str]]:
    """Every initializer of the ONNX file: (element count, TensorRT's name for its type), read with onnx."""
    import onnx

    names = {onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.FLOAT: "FLOAT"}
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: (int(np.prod(i.dims)), names.get(i.data_type, "OTHER")) for i in model.graph.initializer}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_plan_marks_exactly_the_lora_target_weights_refittable(fp16_folders, family):
    from edgelora.converters.tensorrt.folder import plan_for_folder

    folder = fp16_folders[family]
    plan = plan_for_folder(folder, load_target("tensorrt-fp16"))
    manifest = json.loads((folder / "manifest.json").read_text())
    wanted = {loc["initializer"] for loc in manifest["name_map"]["modules"].values()}
    assert set(plan.refittable) == wanted and wanted
    inits = _onnx_initializers(folder / "base" / "model.onnx")
    assert all(inits[name][1] == "HALF" for name in plan.refittable)  # fp16 weights: a strongly typed build
    assert plan.flags == ("REFIT_INDIVIDUAL",) and "REFIT_IDENTICAL" not in plan.flags
    shapes = {p.name: p for p in plan.profiles}
    assert set(shapes) == set(manifest["base"]["io"]["inputs"])
    assert shapes["input_ids"].min == (1, 1) and shapes["input_ids"].max == (1, 128)
    if family == "llama":
        io = manifest["base"]["io"]
        past = shapes["past_key_values.0.key"]
        assert past.min == (1, io["num_kv_heads"], 0, io["head_dim"]) and past.max[2] == 128
        assert shapes["attention_mask"].max == (1, 256)
    assert plan_for_folder(folder, load_target("tensorrt-fp16"), strip=True).flags == ("REFIT_INDIVIDUAL",
                                                                                       "STRIP_PLAN")


def test_a_built_engine_is_held_to_the_plan(fp16_folders):
    """Prototypes as a refitter reports them (here: every initializer of the ONNX file, read with onnx, as the
    ONNX parser names weights): the plan's check passes, and a weight folded away, of another type or of
    another size is a one-line error naming the LoRA target."""
    from edgelora.converters.tensorrt.folder import plan_for_folder
    from edgelora.converters.tensorrt.plan import check_prototypes

    folder = fp16_folders["bert"]
    plan = plan_for_folder(folder, load_target("tensorrt-fp16"))
    recorded = _onnx_initializers(folder / "base" / "model.onnx")
    check_prototypes(plan, recorded)
    name = plan.refittable[0]
    module = next(m for m, i in plan.modules.items() if i == name)
    for broken, why in (({k: v for k, v in recorded.items() if k != name}, "is not refittable"),
                        ({**recorded, name: (recorded[name][0], "FLOAT")}, "is FLOAT, the plan refits HALF"),
                        ({**recorded, name: (recorded[name][0] - 1, "HALF")}, "values, the ONNX initializer")):
        with pytest.raises(EdgeloraError, match=why) as exc:
            check_prototypes(plan, broken)
        assert module in str(exc.value) and "\n" not in str(exc.value)


def test_the_plan_refuses_a_folder_of_another_precision_or_a_name_map_that_disagrees(fp16_folders, family_adapters,
                                                                                      tmp_path):
    from edgelora.converters.tensorrt.folder import initializer_types, plan_for_folder
    from edgelora.converters.tensorrt.plan import make_plan

    from edgelora.export import export
    from edgelora.format.manifest import parse_section

    base, adapters = family_adapters["bert"]
    fp32 = tmp_path / "fp32"
    export(base, adapters, load_target("cpu-fp32"), fp32, threads=1, latency_runs=2)
    with pytest.raises(EdgeloraError, match="exported for cpu-fp32 \\(fp32\\); tensorrt-fp16 builds fp16"):
        plan_for_folder(fp32, load_target("tensorrt-fp16"))
    copy = tmp_path / "copy"
    shutil.copytree(fp16_folders["bert"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    module, loc = next(iter(manifest["name_map"]["modules"].items()))
    loc["initializer"] = "not_there"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    locations = parse_section("locations", manifest["name_map"]["modules"], "manifest.json")
    with pytest.raises(EdgeloraError, match=f"LoRA target {module}: its weight 'not_there' is not an initializer"):
        make_plan("model.onnx", manifest["base"]["io"], locations, initializer_types(copy / "base" / "model.onnx"),
                  load_target("tensorrt-fp16"))


def test_a_tensorrt_target_without_tensorrt_is_a_one_line_error(family_adapters, tmp_path, cli):
    from edgelora.converters.tensorrt.builder import available

    why = available()
    if why is None:
        pytest.skip("TensorRT can build here: the refusal is for machines without it")
    base, adapters = family_adapters["bert"]
    name, path = next(iter(adapters.items()))
    res = cli("export", "--base", str(base), "--adapter", f"{name}={path}", "--target", "tensorrt-fp16",
              "-o", str(tmp_path / "out"))
    assert res.code == 2 and "target tensorrt-fp16 (backend tensorrt) cannot export here" in res.err
    assert why in res.err and len(res.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.gpu
def test_a_refittable_engine_builds_and_matches_its_plan(fp16_folders, tmp_path):
    """On a GPU: the tiny BERT's engine builds with only its LoRA-target weights refittable (the build itself
    checks the refitter's prototypes against the plan)."""
    from edgelora.converters.tensorrt.builder import available
    from edgelora.converters.tensorrt.folder import build_for_folder

    why = available()
    if why is not None:
        pytest.skip(f"TensorRT cannot build here: {why}")
    info = build_for_folder(fp16_folders["bert"], load_target("tensorrt-fp16"), tmp_path / "model.engine")
    assert info["bytes"] > 0 and info["refittable"] > 0
    assert (tmp_path / "model.timing-cache").is_file()
