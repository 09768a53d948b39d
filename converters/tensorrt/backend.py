"""The registry entry for ``backend = "tensorrt"``. Until a GPU run has checked the engine path end to end,
``edgelora export`` with a TensorRT target refuses in one line, naming what is missing here and what to run."""

from __future__ import annotations

from edgelora.converters.onnx.backend import OnnxRuntimeBackend

from .builder import available


class TensorRTBackend(OnnxRuntimeBackend):
    name = "tensorrt"

    def unavailable(self) -> str | None:
        why = available()
        if why is not None:
            return why
        return ("export does not build TensorRT engines yet: export with cuda-fp16, then build the refittable "
                "engine with edgelora.converters.tensorrt.folder.build_for_folder (scripts/gpu-check runs it)")
