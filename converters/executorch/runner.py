"""Running a folder's programs with ExecuTorch's Python runtime (``executorch.runtime``), as a device would.

What the installed runtime (executorch 1.5.1) offers, read from ``executorch/runtime/__init__.py`` and
``extension/pybindings/pybindings.pyi``: ``Runtime.load_program(pte, data_path=PTD)`` takes ONE data file, and a
loaded method's weights are fixed (XNNPACK packs them when the method loads). So a task switch is either loading
the task's merged program against the shared ``base.ptd`` (the weights that differ travel inside its ``.pte``),
or feeding another task's A, B and head to the one branch program (no load at all). Two data files per program
(a shared base ``.ptd`` plus a per-task ``.ptd``) is what ExecuTorch's C++ ``Module`` does for its LoRA
programs; the Python runtime here cannot, which is why the per-task weights of the merged form sit in its
``.pte``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INSTALL = "pip install 'edgelora[executorch]'"


def unavailable() -> str | None:
    """None when ExecuTorch and its XNNPACK delegate can be used here, else the one-line reason and fix."""
    try:
        import executorch.exir  # noqa: F401
        from executorch.runtime import Runtime
    except ImportError as exc:
        return f"executorch is not installed ({exc.name or exc}); {INSTALL}"
    try:
        if not Runtime.get().backend_registry.is_available("XnnpackBackend"):
            return f"this executorch build has no XNNPACK delegate; reinstall it ({INSTALL})"
    except Exception as exc:  # a broken native library: say so in one line
        return f"executorch's runtime does not load here ({type(exc).__name__}: {exc}); {INSTALL}"
    return None


def set_threads(threads: int) -> None:
    """The XNNPACK threadpool's size (one pool per process)."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def load(pte: Path, ptd: Path) -> Any:
    """The ``forward`` method of ``pte`` with its named data read from ``ptd`` (weights packed now)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(pte), data_path=str(ptd))
    return program.load_method("forward")


def run(method: Any, inputs: Sequence[np.ndarray]) -> np.ndarray:
    """One call; numpy in, the first output as numpy out."""
    import torch

    out = method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
    return out[0].numpy().copy()


def call(method: Any, inputs: Sequence[Any]) -> Any:
    """One call on inputs already converted to torch tensors (what the latency timings run)."""
    return method.execute(inputs)
