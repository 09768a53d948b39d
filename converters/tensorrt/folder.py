"""A TensorRT build plan for an exported deployment folder: its fp16 base engine (``base/model.onnx``) and the
manifest's name map say which initializers hold the LoRA targets' W0 (the fp16 cast keeps initializer names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError
from edgelora.format.manifest import read_manifest

from .plan import BuildPlan, make_plan


def initializer_types(onnx_path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, ONNX type name)}`` of every initializer, read without loading external data."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {i.name: (tuple(int(d) for d in i.dims), onnx.TensorProto.DataType.Name(i.data_type))
            for i in model.graph.initializer}


def plan_for_folder(folder: Path, target: Any, strip: bool = False) -> BuildPlan:
    manifest = read_manifest(folder)
    if manifest.target.precision != target.precision:
        raise EdgeloraError(f"{folder}: exported for {manifest.target.name} ({manifest.target.precision}); "
                            f"{target.name} builds {target.precision} engines: export with a "
                            f"{target.precision} target first")
    onnx_path = folder / manifest.base.engine
    return make_plan(str(onnx_path), manifest.base.io.to_json(), manifest.name_map, initializer_types(onnx_path),
                     target, strip)


def build_for_folder(folder: Path, target: Any, out: Path, strip: bool = False) -> dict[str, Any]:
    """Build the refittable engine of ``folder``'s base into ``out`` (GPU only), its timing cache beside it."""
    from .builder import available, build

    why = available()
    if why is not None:
        raise EdgeloraError(f"TensorRT cannot build here: {why}")
    plan = plan_for_folder(folder, target, strip)
    return build(plan, out, timing_cache=out.with_suffix(".timing-cache"))
