"""The TensorRT calls: build a serialized engine from a :class:`~.plan.BuildPlan`, read a built engine's refit
prototypes. Needs the ``tensorrt`` package and an NVIDIA GPU (``pip install 'edgelora[gpu]'``); imported only
when a TensorRT target is built. Written against TensorRT 10's Python API (strongly typed networks,
``REFIT_INDIVIDUAL``, ``mark_weights_refittable``, ``STRIP_PLAN``).

NOT YET RUN: no GPU was lent to the work that wrote this module. ``scripts/gpu-check`` runs
``tests/test_tensorrt.py``'s GPU tests, which build a tiny engine with it and hold the refitter to the plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelora.errors import EdgeloraError

from .plan import BuildPlan, check_prototypes


def available() -> str | None:
    """None when TensorRT can build here; else why not, in words a user can act on. (Not torch.cuda: the
    constraints install torch's CPU build, which sees no GPU even on a GPU machine.)"""
    import shutil
    import subprocess

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install 'edgelora[gpu]' on a machine with an NVIDIA GPU)"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA driver here (nvidia-smi not found)"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return "nvidia-smi lists no GPU"
    return None


def _logger() -> Any:
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build(plan: BuildPlan, out: Path, timing_cache: Path | None = None, workspace_mb: int = 2048) -> dict[str, Any]:
    """Serialize the engine of ``plan`` to ``out``; the timing cache is read and written back when given.
    Returns what the report shows (TensorRT version, size, refittable weights)."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(plan.onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgeloraError(f"TensorRT could not parse {plan.onnx}: {errors[:300]}")
    by_weight = {init: module for module, init in plan.modules.items()}
    for name in plan.refittable:
        if not network.mark_weights_refittable(name):
            raise EdgeloraError(f"TensorRT: LoRA target {by_weight[name]}: weight {name!r} cannot be marked "
                                "refittable (not a weight of the parsed network)")
    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for p in plan.profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeloraError(f"TensorRT could not build an engine from {plan.onnx}; see its log above")
    out.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    check_prototypes(plan, prototypes(out.read_bytes()))
    return {"tensorrt": trt.__version__, "bytes": out.stat().st_size, "refittable": len(plan.refittable)}


def prototypes(engine: bytes) -> dict[str, tuple[int, str]]:
    """``{weight name: (element count, DataType name)}`` of every refittable weight of a serialized engine."""
    import tensorrt as trt

    logger = _logger()
    runtime = trt.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(engine)
    if cuda_engine is None:
        raise EdgeloraError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
    refitter = trt.Refitter(cuda_engine, logger)
    out = {}
    for name in refitter.get_all_weights():
        proto = refitter.get_weights_prototype(name)
        out[name] = (int(proto.size), str(proto.dtype).rsplit(".", 1)[-1])
    return out
