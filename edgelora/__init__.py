"""edgelora: LoRA adapters to the edge.

The library, one module per step (see ../shared/DESIGN.md):

- :mod:`edgelora.adapter`  PEFT adapter folders in and out, losslessly
- :mod:`edgelora.names`    the one place that knows PEFT's key and module-matching formats
- :mod:`edgelora.base`     base models: bundled default, folders, fingerprint, loading per task
- :mod:`edgelora.validate` adapter vs base checks -> a merge plan
- :mod:`edgelora.merge`    the merge math (pure ``delta``), into state dicts and models, unmerge
- :mod:`edgelora.train`    LoRA training with PEFT (paper recipe)
- :mod:`edgelora.cli`      the ``edgelora`` command

Heavy dependencies (torch, transformers, peft) are imported by the modules that need them, not here.
"""

import logging as _logging
import os as _os

from .errors import EdgeloraError, EdgeloraWarning

# ONNX Runtime 1.2x's Linux/macOS builds start telemetry when the module is imported: a device id and an event
# database under ~/.cache/Microsoft/DeveloperTools/.onnxruntime, and uploads. ORT_DISABLE_TELEMETRY=1 stops all
# of it, but only if set before onnxruntime is imported; an application that imported it first, or set the
# variable itself, keeps its own choice.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# torchao (installed with the executorch extra) is imported by transformers and peft whenever it is present; its
# CUDA-only extensions then log "Failed to load ..." on a CPU torch, and torch's pytree logs deprecations for
# its enums. Neither concerns edgelora: keep them off stderr unless the application set those loggers itself.
for _name in ("torchao", "torch.utils._pytree"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.ERROR)

__version__ = "0.1.0"
__all__ = ["EdgeloraError", "EdgeloraWarning", "__version__"]
