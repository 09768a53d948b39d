"""The registry entry for ``backend = "executorch"``: ExecuTorch programs with the XNNPACK delegate.

The ONNX steps of ``edgelora export`` (a base engine patched into task engines, name maps over initializers)
do not fit a backend whose weights are packed when a program loads, so this backend brings its own steps
(``export.STEPS``), run by the same export over the same checked adapters, in the same atomic folder.
ExecuTorch is an optional extra, imported only when a step runs; without it, ``unavailable`` says what to
install and the export stops before anything is written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import runner

if TYPE_CHECKING:
    from .export import State


class ExecuTorchBackend:
    """One instance per export (``edgelora.converters.get_backend``): it owns what the steps build."""

    name = "executorch"

    def __init__(self) -> None:
        self.state: State | None = None  # set by export.build_programs, read by the later steps

    def unavailable(self) -> str | None:
        return runner.unavailable()

    @property
    def steps(self) -> list[Callable[[Any], None]]:
        from .export import STEPS

        return STEPS
